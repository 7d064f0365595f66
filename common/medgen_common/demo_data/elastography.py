"""Synthetic paired B-mode and strain elastograms of breast-like lesions (the V-EUS demo data, elastography spec
section 7.2), with a decoupled negative control and a pocket-device B-mode for test-time domain shift.

One case = one 2D frame with one lesion. Arrays are (H, W): rows are depth (row 0 touches the probe), columns
lateral; ``FIELD_OF_VIEW_MM`` square. Each case is simulated on a grid twice as fine as the output and block-averaged.

Lesion classes (``LESION_CLASSES``, case i has class ``i % 3``: equal prevalence; ``malignant`` is the positive
label) and the rules that tie B-mode appearance to stiffness:

    class       stiffness / background (log-uniform)   margin                       echo power   posterior gain
    malignant   3-8                                    irregular (radial harmonics)  0.02-0.06    0.35-0.6 (shadow)
    benign      1.3-2.5                                smooth oval                   0.15-0.35    1.0-1.25
    soft        0.3-0.7 (cyst, lipoma)                 smooth oval                   0.003-0.01   1.3-1.7 (enhancement)

    The lesion is an ellipse centred in [0.3, 0.7]^2 of the field, semi-axes 0.08-0.18 and 0.06-0.14 of it, at a
    random angle; an irregular margin scales its radius by 1 + 0.18 sin(k phi + p1) + 0.10 sin(2 k phi + p2),
    k in 5-8. Background: a smooth Gaussian field f (sigma 6 output pixels) with modulus exp(0.2 f) and echo power
    exp(0.5 f), so brighter (glandular) tissue is also stiffer.

B-mode (baseband convolution model): circular complex Gaussian scatterers with the echo power, an anisotropic
Gaussian PSF (axial 0.7, lateral 1.5 fine pixels), envelope, times the posterior gain (the columns under the lesion
below its deepest point, smoothed by 2 output pixels) and an imperfect TGC exp(-1.2 z)(1 + 0.8 z), z the depth
fraction; intensity block-averaged to the output grid, log-compressed over 40 dB below its 99.5th percentile and
quantised to 256 grey levels. The pocket device (``POCKET``) has a 1.75x wider PSF, additive noise and 32 levels.

Strain (quasi-static, uniform stress): strain = G_1.5px * (1 / modulus), optionally times exp(depth_noise z n)
(n a smooth unit field: attenuation artefacts at depth), shown relative to its image mean on the 64-level jet
bar (``medgen_common.elastography``: index 0 dark blue = hard). The ground-truth strain ratio is computed from the
quantised index map, i.e. what a perfect generator could reproduce.

Negative control (``coupled=False``): the margin, echo power and posterior gain follow a class drawn independently
of the stiffness class; geometry, stiffness, speckle and labels are those of the coupled case with the same index.

Limits, stated plainly: the coupling rules are hand-set, not physiology; uniform stress ignores stress
concentration and lateral coupling; there is no anatomy besides one lesion in a textured background; the
ground-truth SR separates the classes almost perfectly (far easier than the clinical task).

Files (``OUT/<grid>/`` and, with ``decoupled_control``, ``OUT/<grid>_decoupled/``), channel-last NIfTI:
``2d/case-XXXX_bmode.nii.gz`` (H x W x 1 float32 in [0, 1]), ``_elastogram`` (H x W x 3 float32 RGB in [0, 1]),
``_mask`` (H x W x 1 uint8), ``_strain_index`` (H x W x 1 uint8, 0-63), and for test cases ``_bmode_pocket``;
``datalist_2d.json`` with splits "training", "validation", "test" of entries {bmode, elastogram, mask,
strain_index, [bmode_pocket], case, lesion_class, malignant, strain_ratio, lesion_depth}.

Determinism: case i uses ``numpy.random.default_rng([seed, i, stream])`` only (stream 0 anatomy, 1 the decoupled
cue class, 2 speckle, 3 pocket speckle), so ``n_subjects=10`` gives the first 10 cases of 40, byte-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..elastography import index_to_rgb, strain_ratio, strain_to_index
from ..writers import save_nifti, write_json
from .splits import check_dataset_arguments, split_names
from .ultrasound import apply_psf, log_compress, smooth_random_field

__all__ = ["LESION_CLASSES", "FIELD_OF_VIEW_MM", "GRIDS", "POCKET", "ElastographyCase", "simulate_case",
           "make_elastography_dataset"]  # fmt: skip

LESION_CLASSES = ("malignant", "benign", "soft")
FIELD_OF_VIEW_MM = 40.0
GRIDS = {"demo": 64, "full": 256}  # output pixels per side
_SUPERSAMPLE = 2
_SPLITS = ("training", "validation", "test")
_GZIP_LEVEL = 1

# per class: stiffness ratio range (log-uniform), echo power range, posterior gain range, irregular margin
_RULES = {
    "malignant": ((3.0, 8.0), (0.02, 0.06), (0.35, 0.6), True),
    "benign": ((1.3, 2.5), (0.15, 0.35), (1.0, 1.25), False),
    "soft": ((0.3, 0.7), (0.003, 0.01), (1.3, 1.7), False),
}


@dataclass(frozen=True)
class Device:
    """B-mode display of a scanner: PSF widths in fine pixels, grey levels and additive display noise."""

    axial_psf_px: float = 0.7
    lateral_psf_px: float = 1.5
    grey_levels: int = 256
    noise_std: float = 0.0


SCANNER = Device()
POCKET = Device(axial_psf_px=0.7 * 1.75, lateral_psf_px=1.5 * 1.75, grey_levels=32, noise_std=0.04)


@dataclass(frozen=True)
class ElastographyCase:
    """One simulated frame on the output grid: ``bmode`` and ``bmode_pocket`` (H, W) float32 in [0, 1],
    ``elastogram`` (3, H, W) float32 RGB, ``strain_index`` (H, W) uint8 0-63, ``mask`` (H, W) uint8, and the
    lesion's ``lesion_class``, ``cue_class`` (the class its B-mode cues follow), ``strain_ratio`` and
    ``lesion_depth`` (centre depth as a fraction of the field)."""

    bmode: np.ndarray
    bmode_pocket: np.ndarray
    elastogram: np.ndarray
    strain_index: np.ndarray
    mask: np.ndarray
    lesion_class: str
    cue_class: str
    strain_ratio: float
    lesion_depth: float


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _render_bmode(echo: np.ndarray, gain: np.ndarray, device: Device, rng: np.random.Generator) -> np.ndarray:
    """B-mode (H/2, W/2) in [0, 1] of a fine echo-power map (H, W) with posterior gain (H, W)."""
    size = echo.shape[0]
    field = np.sqrt(echo / 2.0) * (rng.standard_normal(echo.shape) + 1j * rng.standard_normal(echo.shape))
    envelope = np.abs(apply_psf(field, 1.0, device.axial_psf_px, device.lateral_psf_px))
    depth = (np.arange(size) + 0.5) / size
    envelope *= gain * (np.exp(-1.2 * depth) * (1.0 + 0.8 * depth))[:, None]
    intensity = (envelope**2).reshape(size // _SUPERSAMPLE, _SUPERSAMPLE, -1, _SUPERSAMPLE).mean((1, 3))
    image = log_compress(intensity, 40.0, gain_db=-10.0 * math.log10(np.percentile(intensity, 99.5)))
    if device.noise_std > 0:
        image = np.clip(image + rng.normal(0.0, device.noise_std, image.shape), 0.0, 1.0)
    levels = device.grey_levels - 1
    return (np.round(image * levels) / levels).astype(np.float32)


def simulate_case(seed: int, index: int, size: int = 64, coupled: bool = True, depth_noise: float = 0.0) -> ElastographyCase:
    """Simulate case ``index`` of dataset ``seed`` on a ``size`` x ``size`` output grid (module docstring)."""
    rng = np.random.default_rng([seed, index, 0])
    lesion_class = LESION_CLASSES[index % len(LESION_CLASSES)]
    cue_class = lesion_class if coupled else LESION_CLASSES[np.random.default_rng([seed, index, 1]).integers(3)]
    fine = size * _SUPERSAMPLE
    # geometry and every random number are drawn in the same order for every class, so the coupled and decoupled
    # cases of one index differ only in the rules their B-mode follows
    centre = rng.uniform(0.3, 0.7, 2)
    semi_axes = np.array([rng.uniform(0.08, 0.18), rng.uniform(0.06, 0.14)])
    angle = rng.uniform(0.0, math.pi)
    harmonic, phases = rng.integers(5, 9), rng.uniform(0.0, 2 * math.pi, 2)
    stiffness_u, echo_u, gain_u = rng.random(3)
    background = smooth_random_field(rng, (fine, fine), 6.0 * _SUPERSAMPLE)
    depth_field = smooth_random_field(rng, (size, size), 6.0)

    rows, cols = (np.mgrid[0:fine, 0:fine] + 0.5) / fine
    dy, dx = rows - centre[0], cols - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    radius = np.sqrt((u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2)
    stiffness_range, _, _, _ = _RULES[lesion_class]
    _, echo_range, gain_range, irregular = _RULES[cue_class]
    if irregular:
        phi = np.arctan2(v / semi_axes[1], u / semi_axes[0])
        radius = radius / (1.0 + 0.18 * np.sin(harmonic * phi + phases[0]) + 0.10 * np.sin(2 * harmonic * phi + phases[1]))
    lesion = radius <= 1.0

    ratio = math.exp(math.log(stiffness_range[0]) + stiffness_u * math.log(stiffness_range[1] / stiffness_range[0]))
    modulus = np.exp(0.2 * background) * np.where(lesion, ratio, 1.0)
    echo_power = echo_range[0] + echo_u * (echo_range[1] - echo_range[0])
    echo = np.where(lesion, echo_power * np.exp(0.2 * background), np.exp(0.5 * background))
    gain = np.ones((fine, fine))
    lesion_columns = lesion.any(0)
    deepest = np.where(lesion_columns, fine - 1 - np.argmax(lesion[::-1], axis=0), fine)
    below = np.arange(fine)[:, None] > deepest[None, :]
    gain[below] = gain_range[0] + gain_u * (gain_range[1] - gain_range[0])
    gain = ndimage.gaussian_filter(gain, 2.0 * _SUPERSAMPLE)

    bmode = _render_bmode(echo, gain, SCANNER, np.random.default_rng([seed, index, 2]))
    bmode_pocket = _render_bmode(echo, gain, POCKET, np.random.default_rng([seed, index, 3]))

    def block_mean(array: np.ndarray) -> np.ndarray:
        return array.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean((1, 3))

    strain = block_mean(ndimage.gaussian_filter(1.0 / modulus, 1.5 * _SUPERSAMPLE))
    if depth_noise > 0:
        strain *= np.exp(depth_noise * ((np.arange(size) + 0.5) / size)[:, None] * depth_field)
    strain_index = strain_to_index(strain / strain.mean())
    mask = (block_mean(lesion.astype(np.float64)) >= 0.5).astype(np.uint8)
    return ElastographyCase(
        bmode=bmode, bmode_pocket=bmode_pocket, elastogram=index_to_rgb(strain_index),
        strain_index=strain_index.astype(np.uint8), mask=mask, lesion_class=lesion_class, cue_class=cue_class,
        strain_ratio=strain_ratio(strain_index, mask), lesion_depth=float(centre[0]),
    )  # fmt: skip


def make_elastography_dataset(
    out_dir: str | Path,
    n_subjects: int = 750,
    seed: int = 0,
    grids: tuple[str, ...] = ("demo",),
    coupled: bool = True,
    decoupled_control: bool = True,
    depth_noise: float = 0.0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, Path]:
    """Write simulated B-mode / strain-elastogram pairs and their MONAI datalist.

    Parameters
    ----------
    out_dir : output root; each grid gets ``out_dir/<grid>/`` (and ``out_dir/<grid>_decoupled/``).
    n_subjects : number of cases (one lesion each), >= 1.
    seed : dataset seed, >= 0.
    grids : names from ``GRIDS``: "demo" (64 x 64), "full" (256 x 256), both ``FIELD_OF_VIEW_MM`` wide.
    coupled : whether B-mode cues follow the lesion's stiffness class (False: the negative control only).
    decoupled_control : with ``coupled``, also write the negative control of the same cases.
    depth_noise : strength of depth-dependent strain artefacts (0: none).
    val_fraction, test_fraction : fractions of cases in the validation and test splits.

    Returns
    -------
    dict of str to Path: datalist path per "<grid>/2d" and "<grid>_decoupled/2d".

    Raises
    ------
    ValueError: an argument is out of range; the message names it.
    """
    grid_names = check_dataset_arguments(n_subjects, seed, grids, list(GRIDS), val_fraction, test_fraction)
    if isinstance(depth_noise, bool) or not isinstance(depth_noise, (int, float)) or depth_noise < 0:
        raise ValueError(f"depth_noise must be a number >= 0, got {depth_noise!r}.")
    splits = split_names(n_subjects, val_fraction, test_fraction)
    variants = [coupled] + ([False] if coupled and decoupled_control else [])
    digits = max(4, len(str(n_subjects - 1)))
    datalists = {}
    for grid in grid_names:
        size = GRIDS[grid]
        affine = np.diag([FIELD_OF_VIEW_MM / size] * 3 + [1.0])
        for variant in variants:
            folder = grid if variant or not coupled else f"{grid}_decoupled"
            grid_dir = Path(out_dir) / folder
            (grid_dir / "2d").mkdir(parents=True, exist_ok=True)
            entries = {split: [] for split in _SPLITS}
            for index, split in enumerate(splits):
                case = simulate_case(seed, index, size, coupled=variant, depth_noise=depth_noise)
                name = f"case-{index:0{digits}d}"
                arrays = {"bmode": case.bmode, "elastogram": np.moveaxis(case.elastogram, 0, -1), "mask": case.mask,
                          "strain_index": case.strain_index}  # fmt: skip
                if split == "test":
                    arrays["bmode_pocket"] = case.bmode_pocket
                entry = {}
                for key, array in arrays.items():
                    entry[key] = f"2d/{name}_{key}.nii.gz"
                    channels_last = array if array.ndim == 3 else array[..., None]
                    save_nifti(channels_last, grid_dir / entry[key], affine, channel_first=False, compresslevel=_GZIP_LEVEL)
                entries[split].append({
                    **entry, "case": name, "lesion_class": case.lesion_class, "cue_class": case.cue_class,
                    "malignant": int(case.lesion_class == "malignant"), "strain_ratio": round(case.strain_ratio, 6),
                    "lesion_depth": round(case.lesion_depth, 6),
                })  # fmt: skip
            content = {
                **entries,
                "lesion_classes": list(LESION_CLASSES),
                "spacing_mm": [FIELD_OF_VIEW_MM / size] * 3,
                "shape": [size, size, 1],
                "seed": seed,
                "coupled": variant,
                "description": (
                    f"SIMULATED paired B-mode and strain elastograms (grid '{grid}', {'coupled' if variant else 'DECOUPLED negative control'}): "
                    "one ellipse lesion per frame (malignant, benign or soft) whose B-mode margin, echogenicity and "
                    "posterior acoustics follow hand-set rules tied to its stiffness class"
                    + ("" if variant else " drawn independently of stiffness")
                    + "; uniform-stress strain on a 64-level jet bar (blue = hard). Not physiology "
                    "(medgen_common.demo_data.elastography). Images channel-last, RGB and B-mode in [0, 1]; rows are depth."
                ),
            }
            datalists[f"{folder}/2d"] = write_json(content, grid_dir / "datalist_2d.json")
    return datalists
