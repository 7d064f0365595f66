"""Shared code of the medgen-bundles collection: runtime settings, datalists, transforms, losses, engines,
sampling, metrics, writers, evaluation and the demo-data simulators. Bundles name these from their configs
(``"_target_": "medgen_common.transforms.NormaliseProbabilitiesd"`` or ``"$medgen_common.select_device('auto')"``).

Submodules load on first use, so ``import medgen_common`` is cheap (the demo-data tools need neither torch nor
MONAI's engines).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "benchmark",
    "classification_utility",
    "compressed_sensing",
    "context_selection",
    "csg",
    "csg_evaluation",
    "datalist",
    "demo_data",
    "dicom_io",
    "edges",
    "downstream_statistics",
    "elastography",
    "elastography_evaluation",
    "engines",
    "guidance",
    "handlers",
    "integrity",
    "karras",
    "label_evaluation",
    "label_statistics",
    "losses",
    "mask_editing",
    "metrics",
    "mri",
    "mri_reconstruction",
    "networks",
    "posterior_sampling",
    "reader_study",
    "runtime",
    "sampling",
    "segmentation_utility",
    "spade",
    "stylegan",
    "text",
    "text_diffusion",
    "text_evaluation",
    "text_generation",
    "training_state",
    "transforms",
    "volume_slices",
    "writers",
)
_RUNTIME_FUNCTIONS = ("autocast_dtype", "autocast_enabled", "configure_threads", "seed_everything", "select_device")
__all__ = list(_SUBMODULES + _RUNTIME_FUNCTIONS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _RUNTIME_FUNCTIONS:
        return getattr(importlib.import_module(".runtime", __name__), name)
    raise AttributeError(f"module 'medgen_common' has no attribute '{name}'")
