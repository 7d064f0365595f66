"""Shared code of the medgen-bundles collection: runtime settings, datalists, transforms, losses, engines,
sampling, metrics, writers, evaluation and the demo-data simulators. Bundles name these from their configs
(``"_target_": "medgen_common.transforms.NormaliseProbabilitiesd"`` or ``"$medgen_common.select_device('auto')"``)."""

from . import (
    datalist,
    engines,
    handlers,
    label_evaluation,
    label_statistics,
    losses,
    metrics,
    runtime,
    sampling,
    transforms,
    writers,
)
from .runtime import autocast_dtype, autocast_enabled, configure_threads, seed_everything, select_device

__version__ = "0.1.0"
__all__ = [
    "autocast_dtype",
    "autocast_enabled",
    "configure_threads",
    "datalist",
    "engines",
    "handlers",
    "label_evaluation",
    "label_statistics",
    "losses",
    "metrics",
    "runtime",
    "sampling",
    "seed_everything",
    "select_device",
    "transforms",
    "writers",
]
