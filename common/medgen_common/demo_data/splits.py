"""What every demo-data generator shares: checks of its common arguments and the split of subjects into training,
validation and test."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["check_dataset_arguments", "split_names"]


def _check_integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_dataset_arguments(
    n_subjects, seed, grids: str | Iterable[str], known_grids: Sequence[str], val_fraction, test_fraction, **counts
) -> tuple[str, ...]:
    """Raise ValueError naming the first bad argument; return the grid names without repeats.

    ``n_subjects`` and every keyword in ``counts`` (e.g. ``slices_per_subject``) must be integers >= 1, ``seed`` an
    integer >= 0, the fractions in [0, 1) with a sum < 1, and ``grids`` a non-empty selection of ``known_grids``.
    """
    _check_integer("n_subjects", n_subjects, 1)
    _check_integer("seed", seed, 0)
    for name, value in counts.items():
        _check_integer(name, value, 1)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}.")
    grids = (grids,) if isinstance(grids, str) else tuple(dict.fromkeys(grids))
    if not grids:
        raise ValueError(f"grids must name at least one of {list(known_grids)}.")
    for grid in grids:
        if grid not in known_grids:
            raise ValueError(f"unknown grid {grid!r} in grids; choose from {list(known_grids)}.")
    return grids


def split_names(n_subjects: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split of each subject, in order training, validation, test; with n >= 3 every requested split gets one."""
    counts = {
        "validation": math.floor(n_subjects * val_fraction + 0.5),
        "test": math.floor(n_subjects * test_fraction + 0.5),
    }
    if n_subjects >= 3:
        for split, fraction in (("validation", val_fraction), ("test", test_fraction)):
            if fraction > 0:
                counts[split] = max(counts[split], 1)
    while counts["validation"] + counts["test"] > n_subjects - 1:  # keep at least one training subject
        larger = max(counts, key=counts.get)
        counts[larger] -= 1
    n_training = n_subjects - counts["validation"] - counts["test"]
    return ["training"] * n_training + ["validation"] * counts["validation"] + ["test"] * counts["test"]
