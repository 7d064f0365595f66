"""Segmentation tasks for the edge-guided LDM demo (EMIT-Diff's setting, other_seeds spec section 1): breast-
ultrasound-like lesions and the prostate gland, each a set of 2D images with a binary mask and a
"modality, organ, category" prompt.

- ``breast_us``: the B-mode of :mod:`.elastography` (speckle from a scatterer field, PSF, log compression; one
  lesion per case, malignant, benign or soft, with the class's B-mode cues) and its lesion mask;
- ``prostate_mr``: the T2W slice of :mod:`.prostate` (zones, rectum, a lesion in half of the cases) and the gland
  mask (transition + peripheral zone).

Both on a 64 x 64 grid ("demo"; "full": 256 x 256). The ADC and DW images of the training prostate cases are also
written, under the split ``"pretraining"`` (images and prompts, no masks), so that the pre-training stage sees
every demo modality, as EMIT-Diff's stage 1 sees all of RadImageNet.

Files (``OUT/<grid>/``), channel-last NIfTI: ``2d/<task>-XXXX_image.nii.gz`` (H x W x 1 float32 in [0, 1]) and
``_label.nii.gz`` (H x W x 1 uint8, 1 inside); ``datalist_2d.json`` with splits "training", "validation", "test"
(per task, by case) and "pretraining", entries {image, label, task, subject, slice_index, modality, organ,
category, prompt}.

Determinism: case i of a task uses its simulator's own seeding (``[seed, i]``), so fewer subjects give a prefix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..writers import save_nifti, write_json
from . import elastography, prostate
from .splits import check_dataset_arguments, split_names

__all__ = ["TASKS", "GRIDS", "prompt", "make_segmentation_tasks_dataset"]

TASKS = ("breast_us", "prostate_mr")
GRIDS = {"demo": 64, "full": 256}
_SPLITS = ("training", "validation", "test")
_GZIP_LEVEL = 1
_MR_NAMES = {"t2w": "MR T2", "adc": "MR ADC", "dwi": "MR DWI"}


def prompt(modality: str, organ: str, category: str) -> str:
    """EMIT-Diff's prompt triplet (S2:L112), e.g. ``"ultrasound, breast, malignant lesion"``."""
    return f"{modality}, {organ}, {category}"


def _breast_case(seed: int, index: int, size: int) -> list[tuple[str, np.ndarray, np.ndarray | None, dict]]:
    case = elastography.simulate_case(seed, index, size)
    fields = {"modality": "ultrasound", "organ": "breast", "category": f"{case.lesion_class} lesion"}
    return [("image", case.bmode, (case.mask > 0).astype(np.uint8), fields)]


def _prostate_case(seed: int, index: int, size: int) -> list[tuple[str, np.ndarray, np.ndarray | None, dict]]:
    case = prostate.simulate_case(seed, index, size)
    gland = np.isin(case.zones, (1, 2)).astype(np.uint8)
    category = "suspicious lesion" if case.lesion_present else "no lesion"
    return [
        (sequence, case.images[sequence], gland if sequence == "t2w" else None,
         {"modality": _MR_NAMES[sequence], "organ": "prostate", "category": category})
        for sequence in prostate.SEQUENCES
    ]  # fmt: skip


_SIMULATORS = {
    "breast_us": (_breast_case, elastography.FIELD_OF_VIEW_MM),
    "prostate_mr": (_prostate_case, prostate.FIELD_OF_VIEW_MM),
}


def make_segmentation_tasks_dataset(
    out_dir: str | Path,
    n_subjects: int = 150,
    seed: int = 0,
    grids: tuple[str, ...] = ("demo",),
    tasks: tuple[str, ...] = TASKS,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> dict[str, Path]:
    """Write every task's images, masks and prompts and their MONAI datalist.

    Parameters
    ----------
    out_dir : output root; each grid gets ``out_dir/<grid>/``.
    n_subjects : cases per task (one image each), >= 1.
    seed : dataset seed, >= 0.
    grids : names from ``GRIDS``.
    tasks : a selection of ``TASKS``.
    val_fraction, test_fraction : fractions of each task's cases in the validation and test splits.

    Returns
    -------
    dict of str to Path: datalist path per "<grid>/2d".

    Raises
    ------
    ValueError: an argument is out of range or a task unknown; the message names it.
    """
    grid_names = check_dataset_arguments(n_subjects, seed, grids, list(GRIDS), val_fraction, test_fraction)
    tasks = (tasks,) if isinstance(tasks, str) else tuple(dict.fromkeys(tasks))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a selection of {list(TASKS)}, got {list(tasks)}.")
    splits = split_names(n_subjects, val_fraction, test_fraction)
    digits = max(4, len(str(n_subjects - 1)))
    datalists = {}
    for grid in grid_names:
        size = GRIDS[grid]
        grid_dir = Path(out_dir) / grid
        (grid_dir / "2d").mkdir(parents=True, exist_ok=True)
        entries = {split: [] for split in (*_SPLITS, "pretraining")}
        for task in tasks:
            simulate, field_of_view_mm = _SIMULATORS[task]
            affine = np.diag([field_of_view_mm / size] * 2 + [1.0, 1.0])
            for index, split in enumerate(splits):
                subject = f"{task}-{index:0{digits}d}"
                for view, image, mask, fields in simulate(seed, index, size):
                    stem = subject if mask is not None else f"{subject}_{view}"
                    entry = {"image": f"2d/{stem}_image.nii.gz"}
                    save_nifti(image[..., None].astype(np.float32), grid_dir / entry["image"], affine,
                               channel_first=False, compresslevel=_GZIP_LEVEL)  # fmt: skip
                    entry.update(task=task, subject=subject, slice_index=0, **fields, prompt=prompt(**fields))
                    if mask is None:  # another sequence of the case: pre-training only
                        if split == "training":
                            entries["pretraining"].append(entry)
                        continue
                    entry["label"] = f"2d/{stem}_label.nii.gz"
                    save_nifti(mask[..., None], grid_dir / entry["label"], affine, channel_first=False,
                               compresslevel=_GZIP_LEVEL)  # fmt: skip
                    entries[split].append(entry)
        content = {
            **entries,
            "tasks": list(tasks),
            "shape": [size, size, 1],
            "seed": seed,
            "description": (
                f"SIMULATED segmentation tasks (grid '{grid}'): breast-ultrasound-like lesions (B-mode of "
                "medgen_common.demo_data.elastography, lesion mask) and the prostate gland (T2W of "
                "medgen_common.demo_data.prostate, transition + peripheral zone), each image with a 'modality, "
                "organ, category' prompt; split 'pretraining' holds the other prostate sequences of the training "
                "cases. Images channel-last in [0, 1]."
            ),
        }
        datalists[f"{grid}/2d"] = write_json(content, grid_dir / "datalist_2d.json")
    return datalists
