"""Complex-valued brain MR slices for accelerated-MRI reconstruction (the score_mri_recon demo data).

Source: the brain generator of this package (``brain.make_brain_dataset``: MNI152-based subjects with their own
deformation, atrophy, bias field and lesions), written to ``OUT/brain_source/``. Each 2D slice of the chosen
contrast is scaled to a maximum magnitude of 1 and given a smooth phase, as real MR images have (B0 and receive
phase): phi = ``max_phase`` * f, f a Gaussian random field (sigma ``phase_smoothness`` pixels) scaled to [-1, 1].
The fully sampled image is the ground truth; k-space, masks and coil maps are simulated from it at run time
(``medgen_common.mri``), so one dataset serves every mask, acceleration and coil count.

Files (``OUT/<grid>/``): ``2d/<subject>_zNNN_image.nii.gz`` (H x W x 2 float32: real, imaginary), and
``datalist_2d.json`` with the brain generator's subject-level splits ("training", "validation", "test"; no subject
in two splits) and entries {image, subject, slice_index}.

Determinism: the brain data follows its own seed rules; the phase of a slice uses
``numpy.random.default_rng([seed, subject index, slice index, 7])``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from ..writers import save_nifti, write_json
from .brain import IMAGE_KEYS, make_brain_dataset
from .ultrasound import smooth_random_field

__all__ = ["make_mri_dataset", "smooth_phase"]

_SPLITS = ("training", "validation", "test")


def smooth_phase(rng: np.random.Generator, shape: tuple[int, int], max_phase: float, smoothness: float) -> np.ndarray:
    """A smooth phase map (radians) in [-max_phase, max_phase] of ``shape``."""
    field = smooth_random_field(rng, shape, smoothness)
    return max_phase * field / max(np.abs(field).max(), 1e-12)


def make_mri_dataset(
    out_dir: str | Path,
    n_subjects: int = 40,
    seed: int = 0,
    grids: tuple[str, ...] = ("demo",),
    contrast: str = "t1",
    max_phase: float = math.pi / 2,
    phase_smoothness: float = 8.0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> dict[str, Path]:
    """Write complex brain slices and their datalist; returns the datalist path per "<grid>/2d".

    Raises:
        ValueError: an unknown contrast, a negative phase or smoothness, or an argument the brain generator
            rejects (the message names it).
    """
    if contrast not in IMAGE_KEYS:
        raise ValueError(f"contrast must be one of {list(IMAGE_KEYS)}, got {contrast!r}.")
    if not max_phase >= 0 or not phase_smoothness > 0:
        raise ValueError(f"max_phase must be >= 0 and phase_smoothness > 0, got {max_phase!r}, {phase_smoothness!r}.")
    source_root = Path(out_dir) / "brain_source"
    sources = make_brain_dataset(
        source_root, n_subjects=n_subjects, seed=seed, grids=grids, val_fraction=val_fraction, test_fraction=test_fraction
    )
    datalists = {}
    for name, source_datalist in sources.items():
        if not name.endswith("/2d"):
            continue
        grid = name.split("/")[0]
        source = json.loads(Path(source_datalist).read_text())
        grid_dir = Path(out_dir) / grid
        (grid_dir / "2d").mkdir(parents=True, exist_ok=True)
        entries = {split: [] for split in _SPLITS}
        for split in _SPLITS:
            for item in source.get(split, []):
                image_file = nib.load(str(Path(source_datalist).parent / item[contrast]))
                magnitude = np.asarray(image_file.dataobj, dtype=np.float64).reshape(image_file.shape[:2])
                magnitude /= max(magnitude.max(), 1e-12)
                subject_index = int(item["subject"].split("-")[-1])
                rng = np.random.default_rng([seed, subject_index, int(item["slice_index"]), 7])
                image = magnitude * np.exp(1j * smooth_phase(rng, magnitude.shape, max_phase, phase_smoothness))
                path = f"2d/{item['subject']}_z{int(item['slice_index']):03d}_image.nii.gz"
                channels = np.stack([image.real, image.imag], -1).astype(np.float32)[:, :, None, :]
                save_nifti(channels, grid_dir / path, image_file.affine, channel_first=False, compresslevel=1)
                entries[split].append({"image": path, "subject": item["subject"], "slice_index": item["slice_index"]})
        content = {
            **entries,
            "contrast": contrast,
            "spacing_mm": source.get("spacing_mm"),
            "seed": seed,
            "description": (
                f"Complex brain MR slices (grid '{grid}', {contrast.upper()} magnitude from the MNI152-based brain demo "
                "generator, max 1, times a smooth random phase), channel-last real and imaginary parts; simulate "
                "k-space from them (medgen_common.demo_data.mri)."
            ),
        }
        datalists[f"{grid}/2d"] = write_json(content, grid_dir / "datalist_2d.json")
    return datalists
