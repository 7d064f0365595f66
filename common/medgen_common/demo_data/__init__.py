"""Synthetic demo datasets, one generator per modality: ``GENERATORS[modality](out_dir, n_subjects=..., seed=...)``
writes the files and returns the datalist paths (see ``brain.make_brain_dataset`` for the arguments)."""

from .brain import make_brain_dataset
from .elastography import make_elastography_dataset
from .mri import make_mri_dataset
from .prostate import make_prostate_dataset
from .segmentation_tasks import make_segmentation_tasks_dataset
from .ultrasound import make_msk_dataset

GENERATORS = {
    "brain": make_brain_dataset,
    "msk_ultrasound": make_msk_dataset,
    "elastography": make_elastography_dataset,
    "mri": make_mri_dataset,
    "prostate": make_prostate_dataset,
    "segmentation_tasks": make_segmentation_tasks_dataset,
}
__all__ = ["GENERATORS", "make_brain_dataset", "make_msk_dataset", "make_elastography_dataset", "make_mri_dataset",
           "make_prostate_dataset", "make_segmentation_tasks_dataset"]
