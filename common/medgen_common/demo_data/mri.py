"""Complex-valued brain MR slices for accelerated-MRI reconstruction (the score_mri_recon demo data).

Source: the brain generator of this package (``brain.make_brain_dataset``: MNI152-based subjects with their own
deformation, atrophy, bias field and lesions) on its 3 mm "demo" grid, written to ``OUT/brain_source/``. Each axial
plane of the chosen contrast with at least half the largest brain area is zero-padded to a square (72 x 72), resized
to ``matrix`` x ``matrix`` by area averaging (anti-aliased; 3.375 mm pixels at 64), scaled to a maximum magnitude
of 1 and given a smooth phase, as real MR images have (B0 and receive phase): phi = ``max_phase`` * f, f a Gaussian
random field (sigma ``phase_smoothness`` pixels) scaled to [-1, 1]. The fully sampled image is the ground truth;
k-space, masks and coil maps are simulated from it at run time (``medgen_common.mri``), so one dataset serves every
mask, acceleration and coil count.

Held-out slabs: adjacent slices of one brain are strongly correlated, and every subject is warped from one
template, so a subject-level split alone would let the prior see the test anatomy. Each subject's planes are
numbered from bottom to top; three slabs of ``2 * slab_half_width + 1`` planes centred at 20 %, 50 % and 80 % of
that range are held out. Validation and test subjects contribute only their slab planes; training subjects only
planes more than ``gap`` planes away from every slab (so the nearest training plane is >= (gap + 1) x 3 mm from a
test plane).

Files (``OUT/<grid>/``): ``2d/<subject>_zNNN_image.nii.gz`` (H x W x 1 x 2 float32: real, imaginary, affine with the
resampled pixel size and the plane's position), and ``datalist_2d.json`` with splits "training", "validation" and
"test" (no subject in two splits, no test slab plane in training) and entries {image, subject, slice_index}.

Determinism: the brain data follows its own seed rules; the phase of a slice uses
``numpy.random.default_rng([seed, subject index, slice index, 7])``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..writers import save_nifti, write_json
from .brain import IMAGE_KEYS, axial_brain_planes, make_brain_dataset
from .ultrasound import smooth_random_field

__all__ = ["SLAB_CENTRES", "make_mri_dataset", "smooth_phase", "slab_split"]

_SPLITS = ("training", "validation", "test")
SLAB_CENTRES = (0.2, 0.5, 0.8)  # held-out slab centres, as fractions of a subject's brain planes (bottom to top)


def smooth_phase(rng: np.random.Generator, shape: tuple[int, int], max_phase: float, smoothness: float) -> np.ndarray:
    """A smooth phase map (radians) in [-max_phase, max_phase] of ``shape``."""
    field = smooth_random_field(rng, shape, smoothness)
    return max_phase * field / max(np.abs(field).max(), 1e-12)


def slab_split(planes: np.ndarray, slab_half_width: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a subject's sorted plane indices into (slab planes, training planes): slabs of ``2 * slab_half_width
    + 1`` planes centred at ``SLAB_CENTRES`` of the range, training planes more than ``gap`` planes from any slab."""
    positions = np.arange(len(planes))
    distance = np.full(len(planes), np.inf)
    for fraction in SLAB_CENTRES:
        distance = np.minimum(distance, np.abs(positions - round(fraction * (len(planes) - 1))))
    return planes[distance <= slab_half_width], planes[distance > slab_half_width + gap]


def _square_resize(magnitude: np.ndarray, affine: np.ndarray, matrix: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad a plane (X, Y) to a square and area-resize it to ``matrix`` x ``matrix``; returns it and its
    affine (in-plane pixel size side / matrix times the original)."""
    side = max(magnitude.shape)
    before = [(side - size) // 2 for size in magnitude.shape]
    square = np.pad(magnitude, [(b, side - size - b) for b, size in zip(before, magnitude.shape)])
    resized = torch.nn.functional.interpolate(torch.from_numpy(square)[None, None], size=(matrix, matrix), mode="area")
    scale = side / matrix
    to_source = np.eye(4)
    for axis in range(2):  # output pixel i has its centre at padded coordinate (i + 0.5) * scale - 0.5
        to_source[axis, axis] = scale
        to_source[axis, 3] = 0.5 * scale - 0.5 - before[axis]
    return resized[0, 0].numpy(), affine @ to_source


def make_mri_dataset(
    out_dir: str | Path,
    n_subjects: int = 40,
    seed: int = 0,
    contrast: str = "t1",
    matrix: int = 64,
    max_phase: float = math.pi / 2,
    phase_smoothness: float = 8.0,
    slab_half_width: int = 1,
    gap: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> dict[str, Path]:
    """Write complex brain slices and their datalist; returns the datalist path under the key "demo/2d".

    Raises:
        ValueError: an unknown contrast, a bad matrix, phase, smoothness, slab width or gap, or an argument the
            brain generator rejects (the message names it).
    """
    if contrast not in IMAGE_KEYS:
        raise ValueError(f"contrast must be one of {list(IMAGE_KEYS)}, got {contrast!r}.")
    if not max_phase >= 0 or not phase_smoothness > 0:
        raise ValueError(f"max_phase must be >= 0 and phase_smoothness > 0, got {max_phase!r}, {phase_smoothness!r}.")
    if not (isinstance(matrix, int) and matrix >= 8):
        raise ValueError(f"matrix must be an integer >= 8, got {matrix!r}.")
    if not (isinstance(slab_half_width, int) and isinstance(gap, int) and slab_half_width >= 0 and gap >= 0):
        raise ValueError(f"slab_half_width and gap must be integers >= 0, got {slab_half_width!r}, {gap!r}.")
    source_root = Path(out_dir) / "brain_source"
    source_datalist = make_brain_dataset(
        source_root, n_subjects=n_subjects, seed=seed, grids=("demo",), slices_per_subject=1,
        val_fraction=val_fraction, test_fraction=test_fraction,
    )["demo/3d"]  # fmt: skip
    source = json.loads(Path(source_datalist).read_text())
    background_channel = source["channels"].index("background")
    grid_dir = Path(out_dir) / "demo"
    (grid_dir / "2d").mkdir(parents=True, exist_ok=True)
    entries = {split: [] for split in _SPLITS}
    for split in _SPLITS:
        for item in source.get(split, []):
            image_file = nib.load(str(Path(source_datalist).parent / item[contrast]))
            volume = np.asarray(image_file.dataobj, dtype=np.float64)
            background = np.asarray(nib.load(str(Path(source_datalist).parent / item["label"])).dataobj)[..., background_channel]
            slab, training = slab_split(axial_brain_planes(1.0 - background), slab_half_width, gap)
            subject_index = int(item["subject"].split("-")[-1])
            for z in training if split == "training" else slab:
                plane_affine = image_file.affine.copy()
                plane_affine[:3, 3] = image_file.affine[:3, :3] @ np.array([0.0, 0.0, z]) + image_file.affine[:3, 3]
                magnitude, affine = _square_resize(volume[:, :, z], plane_affine, matrix)
                magnitude /= max(magnitude.max(), 1e-12)
                rng = np.random.default_rng([seed, subject_index, int(z), 7])
                image = magnitude * np.exp(1j * smooth_phase(rng, magnitude.shape, max_phase, phase_smoothness))
                path = f"2d/{item['subject']}_z{int(z):03d}_image.nii.gz"
                channels = np.stack([image.real, image.imag], -1).astype(np.float32)[:, :, None, :]
                save_nifti(channels, grid_dir / path, affine, channel_first=False, compresslevel=1)
                entries[split].append({"image": path, "subject": item["subject"], "slice_index": int(z)})
    content = {
        **entries,
        "contrast": contrast,
        "matrix": [matrix, matrix],
        "slab_centres": list(SLAB_CENTRES),
        "slab_half_width": slab_half_width,
        "gap": gap,
        "seed": seed,
        "description": (
            f"Complex brain MR slices ({contrast.upper()} magnitude from the MNI152-based brain demo generator, "
            f"{matrix} x {matrix}, max 1, times a smooth random phase), channel-last real and imaginary parts; "
            "held-out subjects and held-out slabs; simulate k-space from them (medgen_common.demo_data.mri)."
        ),
    }
    return {"demo/2d": write_json(content, grid_dir / "datalist_2d.json")}
