"""Synthetic bi-parametric prostate MR slices (the prostate_text_ldm demo data, prostate spec section 7.1): aligned
T2W, ADC and high-b DW images of one geometry per case, with zones and, with probability 0.5, a lesion.

One case = one axial slice, arrays (H, W), rows anterior (row 0) to posterior, ``FIELD_OF_VIEW_MM`` square,
rendered on a grid twice as fine as the output and block-averaged (partial volume at every edge).

Geometry (normalised coordinates, x lateral and y posterior in [-1, 1]):
- body: an ellipse with radii 0.82-0.9 by 0.62-0.7, centre jittered by 0.03;
- gland: an ellipse centred at (±0.06, -0.05 ± 0.06), radii 0.30-0.40 by 0.24-0.32, rotated ±15 degrees;
- transition zone (TZ): the anterior part of the gland, an ellipse of 0.65 of its radii shifted anteriorly by 0.3
  of its vertical radius; the peripheral zone (PZ) is the rest of the gland (the posterior crescent);
- rectum: an ellipse of radii 0.16-0.2 by 0.10-0.13 just posterior to the gland;
- lesion (``LESION_PROBABILITY`` 0.5): an ellipse of radius 0.12-0.18 (1.9-2.9 px at 32 px), centred in the PZ with
  probability 0.7, else anywhere in the gland, clipped to the gland.

Intensities per sequence (``CONTRASTS``), each tissue times ``1 + 0.08 f`` with f a smooth unit random field, then a
Gaussian blur and Gaussian noise, all on the fixed window [0, 1] (the stand-in for the per-volume percentile window
of real data: a per-slice window would rescale slices with a bright DW lesion):

    tissue       T2W    ADC    DW (high b)
    air          0.02   0.02   0.02
    body         0.35   0.30   0.08
    TZ           0.45   0.50   0.22
    PZ           0.78   0.68   0.18
    rectum       0.12   0.25   0.05
    lesion       0.22   0.22   0.85
    blur (px)    0.6    1.0    1.0      (output pixels, sigma)
    noise        0.02   0.03   0.03

So a lesion is dark on T2W and ADC and bright on DW, at the same place in all three.

Files (``OUT/<grid>/``), channel-last NIfTI: ``2d/case-XXXX_{t2w,adc,dwi}.nii.gz`` (H x W x 1 float32 in [0, 1]),
``_zones`` (H x W x 1 uint8: 0 outside, 1 TZ, 2 PZ, 3 rectum) and ``_lesion`` (H x W x 1 uint8); ``datalist_2d.json``
with splits "training", "validation", "test" of entries {t2w, adc, dwi, zones, lesion, case, lesion_present,
lesion_centre (row, column in output pixels, or null)}.

Determinism: case i uses ``numpy.random.default_rng([seed, i])`` only, so ``n_subjects=10`` gives the first 10
cases of 40, byte-identical.

Limits, stated plainly: hand-set contrasts, not an MR signal model; one slice per case, no through-plane anatomy;
no bladder, seminal vesicles or coil shading; the lesion is always conspicuous on DW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..writers import save_nifti, write_json
from .splits import check_dataset_arguments, split_names
from .ultrasound import smooth_random_field

__all__ = ["SEQUENCES", "CONTRASTS", "FIELD_OF_VIEW_MM", "GRIDS", "LESION_PROBABILITY", "ProstateCase",
           "simulate_case", "make_prostate_dataset"]  # fmt: skip

SEQUENCES = ("t2w", "adc", "dwi")
FIELD_OF_VIEW_MM = 64.0
GRIDS = {"demo": 32, "full": 128}  # output pixels per side
LESION_PROBABILITY = 0.5
_SUPERSAMPLE = 2
_SPLITS = ("training", "validation", "test")
_GZIP_LEVEL = 1
_TISSUES = ("air", "body", "tz", "pz", "rectum", "lesion")
# per sequence: tissue intensities (order of _TISSUES), blur sigma (output px), noise std
CONTRASTS = {
    "t2w": ((0.02, 0.35, 0.45, 0.78, 0.12, 0.22), 0.6, 0.02),
    "adc": ((0.02, 0.30, 0.50, 0.68, 0.25, 0.22), 1.0, 0.03),
    "dwi": ((0.02, 0.08, 0.22, 0.18, 0.05, 0.85), 1.0, 0.03),
}


@dataclass(frozen=True)
class ProstateCase:
    """One simulated slice on the output grid: ``images`` maps each of ``SEQUENCES`` to (H, W) float32 in [0, 1];
    ``zones`` (H, W) uint8 (0 outside, 1 TZ, 2 PZ, 3 rectum), ``lesion`` (H, W) uint8, ``lesion_present`` and
    ``lesion_centre`` (row, column) of the lesion mask's centroid in output pixels, None without a lesion."""

    images: dict
    zones: np.ndarray
    lesion: np.ndarray
    lesion_present: bool
    lesion_centre: tuple[float, float] | None


def _ellipse(x: np.ndarray, y: np.ndarray, centre, radii, angle: float = 0.0) -> np.ndarray:
    """Boolean mask of the ellipse with ``centre`` (x, y), ``radii`` (rx, ry) rotated by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - centre[0]) * c + (y - centre[1]) * s, -(x - centre[0]) * s + (y - centre[1]) * c
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0


def _block_mean(array: np.ndarray) -> np.ndarray:
    size = array.shape[0] // _SUPERSAMPLE
    return array.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean((1, 3))


def simulate_case(seed: int, index: int, size: int = 32) -> ProstateCase:
    """Simulate case ``index`` of dataset ``seed`` on a ``size`` x ``size`` output grid (see the module docstring)."""
    rng = np.random.default_rng([seed, index])
    fine = size * _SUPERSAMPLE
    coordinates = (np.arange(fine) + 0.5) / fine * 2.0 - 1.0
    y, x = np.meshgrid(coordinates, coordinates, indexing="ij")

    body = _ellipse(x, y, rng.uniform(-0.03, 0.03, 2), (rng.uniform(0.82, 0.9), rng.uniform(0.62, 0.7)))
    gland_centre = np.array([rng.uniform(-0.06, 0.06), -0.05 + rng.uniform(-0.06, 0.06)])
    gland_radii = np.array([rng.uniform(0.30, 0.40), rng.uniform(0.24, 0.32)])
    angle = math.radians(rng.uniform(-15.0, 15.0))
    gland = _ellipse(x, y, gland_centre, gland_radii, angle)
    tz_centre = gland_centre - np.array([-math.sin(angle), math.cos(angle)]) * 0.3 * gland_radii[1]
    tz = gland & _ellipse(x, y, tz_centre, 0.65 * gland_radii, angle)
    pz = gland & ~tz
    rectum_radii = (rng.uniform(0.16, 0.2), rng.uniform(0.10, 0.13))
    rectum = _ellipse(x, y, (gland_centre[0], gland_centre[1] + gland_radii[1] + rectum_radii[1] + 0.04), rectum_radii)
    rectum &= body & ~gland

    lesion = np.zeros_like(gland)
    if rng.random() < LESION_PROBABILITY:
        candidates = np.argwhere(pz if rng.random() < 0.7 else gland)
        row, column = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(0.12, 0.18)
        lesion = gland & _ellipse(
            x,
            y,
            (x[row, column], y[row, column]),
            (radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2)),
            rng.uniform(0, math.pi),
        )

    labels = np.zeros(gland.shape, dtype=np.int64)  # index into _TISSUES
    for value, mask in ((1, body), (2, tz), (3, pz), (4, rectum), (5, lesion)):
        labels[mask] = value
    texture = 1.0 + 0.08 * smooth_random_field(rng, (fine, fine), 3.0 * _SUPERSAMPLE)
    images = {}
    for sequence in SEQUENCES:
        intensities, blur, noise = CONTRASTS[sequence]
        image = np.asarray(intensities)[labels] * np.where(labels > 0, texture, 1.0)
        image = ndimage.gaussian_filter(_block_mean(image), blur)
        image = image + rng.normal(0.0, noise, image.shape)
        images[sequence] = np.clip(image, 0.0, 1.0).astype(np.float32)

    zones = np.zeros((size, size), dtype=np.uint8)
    for value, mask in ((1, tz), (2, pz), (3, rectum)):
        zones[_block_mean(mask.astype(float)) >= 0.5] = value
    lesion_out = (_block_mean(lesion.astype(float)) >= 0.5).astype(np.uint8)
    present = bool(lesion_out.any())
    centre = tuple(float(c) for c in ndimage.center_of_mass(lesion_out)) if present else None
    return ProstateCase(images=images, zones=zones, lesion=lesion_out, lesion_present=present, lesion_centre=centre)


def make_prostate_dataset(
    out_dir: str | Path,
    n_subjects: int = 1200,
    seed: int = 0,
    grids: tuple[str, ...] = ("demo",),
    val_fraction: float = 0.1,
    test_fraction: float = 0.15,
) -> dict[str, Path]:
    """Write simulated T2W / ADC / DW prostate slices and their MONAI datalist.

    Parameters
    ----------
    out_dir : output root; each grid gets ``out_dir/<grid>/``.
    n_subjects : number of cases (one slice each), >= 1.
    seed : dataset seed, >= 0.
    grids : names from ``GRIDS``: "demo" (32 x 32), "full" (128 x 128), both ``FIELD_OF_VIEW_MM`` wide.
    val_fraction, test_fraction : fractions of cases in the validation and test splits.

    Returns
    -------
    dict of str to Path: datalist path per "<grid>/2d".

    Raises
    ------
    ValueError: an argument is out of range; the message names it.
    """
    grid_names = check_dataset_arguments(n_subjects, seed, grids, list(GRIDS), val_fraction, test_fraction)
    splits = split_names(n_subjects, val_fraction, test_fraction)
    digits = max(4, len(str(n_subjects - 1)))
    datalists = {}
    for grid in grid_names:
        size = GRIDS[grid]
        spacing = FIELD_OF_VIEW_MM / size
        affine = np.diag([spacing, spacing, 3.0, 1.0])
        grid_dir = Path(out_dir) / grid
        (grid_dir / "2d").mkdir(parents=True, exist_ok=True)
        entries = {split: [] for split in _SPLITS}
        for index, split in enumerate(splits):
            case = simulate_case(seed, index, size)
            name = f"case-{index:0{digits}d}"
            arrays = {**case.images, "zones": case.zones, "lesion": case.lesion}
            entry = {}
            for key, array in arrays.items():
                entry[key] = f"2d/{name}_{key}.nii.gz"
                save_nifti(
                    array[..., None], grid_dir / entry[key], affine, channel_first=False, compresslevel=_GZIP_LEVEL
                )
            centre = [round(c, 3) for c in case.lesion_centre] if case.lesion_centre is not None else None
            entries[split].append(
                {**entry, "case": name, "lesion_present": int(case.lesion_present), "lesion_centre": centre}
            )
        content = {
            **entries,
            "sequences": list(SEQUENCES),
            "spacing_mm": [spacing, spacing, 3.0],
            "shape": [size, size, 1],
            "seed": seed,
            "description": (
                f"SIMULATED bi-parametric prostate MR slices (grid '{grid}'): aligned T2W, ADC and high-b DW images "
                "of one ellipse geometry per case (transition and peripheral zones, rectum) with a lesion in half "
                "of the cases, dark on T2W and ADC and bright on DW; hand-set contrasts on a fixed [0, 1] window, "
                "not an MR signal model (medgen_common.demo_data.prostate). Images channel-last; rows anterior to "
                "posterior."
            ),
        }
        datalists[f"{grid}/2d"] = write_json(content, grid_dir / "datalist_2d.json")
    return datalists
