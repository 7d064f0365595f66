"""Statistics of synthetic-data utility studies: bootstrap confidence intervals at the patient level, AUROC and
ΔAUROC, class-matched sampling, and the ways synthetic data are mixed into a training set.

Resampling is over patients (segmentation) or cases (classification), never over slices or pixels: slices of one
patient are not independent, and CIs over them would be too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy import stats

__all__ = [
    "bootstrap_mean_ci",
    "bootstrap_difference_ci",
    "roc_auc",
    "auroc",
    "macro_auroc",
    "bootstrap_metric_ci",
    "delta_auroc_ci",
    "class_matched_indices",
    "mix_training_items",
    "patient_folds",
    "patch_mask",
    "patch_mix",
    "MIXING_MODES",
]

MIXING_MODES = ("concat", "replace")


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def bootstrap_mean_ci(
    values: Sequence[float], num_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of per-patient ``values`` (NaNs left out) with a percentile bootstrap CI: ``{"mean", "low", "high", "n"}``."""
    finite = _finite(values)
    if len(finite) == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, len(finite), size=(int(num_resamples), len(finite)))].mean(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(finite.mean()), "low": float(low), "high": float(high), "n": int(len(finite))}


def bootstrap_difference_ci(
    values: Mapping[str, float],
    reference: Mapping[str, float],
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired difference ``values - reference`` over the patients both score (finite in both), mean and bootstrap CI.

    Raises:
        ValueError: the two share no patient.
    """
    shared = [k for k in values if k in reference and math.isfinite(values[k]) and math.isfinite(reference[k])]
    if not shared:
        raise ValueError("the two score sets share no patient with a finite score; a paired difference needs some.")
    return bootstrap_mean_ci([values[k] - reference[k] for k in shared], num_resamples, level, seed)


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U, ties counted half)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape} and {labels.shape}.")
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("an AUC needs both classes among the labels.")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def auroc(scores: Sequence[float] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """:func:`roc_auc` of 1-D ``scores`` and binary ``labels`` (1 positive), NaN instead of an error when one class
    is absent (a resample or a one-vs-rest class without cases)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of one length, got {scores.shape} and {labels.shape}.")
    return roc_auc(scores, labels) if 0 < labels.sum() < len(labels) else math.nan


def macro_auroc(probabilities: torch.Tensor | np.ndarray, labels: Sequence[int] | torch.Tensor) -> float:
    """Mean one-vs-rest AUROC over the classes present, for ``probabilities`` ``[N, K]`` (binary: ``[N, 2]`` gives the
    AUROC of class 1)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise ValueError(f"probabilities must be [N, K] for N labels, got {probabilities.shape} for {len(labels)}.")
    if probabilities.shape[1] == 2:
        return auroc(probabilities[:, 1], labels == 1)
    values = [auroc(probabilities[:, k], labels == k) for k in range(probabilities.shape[1])]
    return float(np.nanmean(values)) if any(math.isfinite(v) for v in values) else math.nan


def bootstrap_metric_ci(
    metric: Callable[[np.ndarray], float],
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | None = None,
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """``metric(index)`` of the cases at ``index`` (an int array) on all cases, with a percentile bootstrap CI over
    resampled patients: ``{"value", "low", "high", "n"}`` (``n``: patients). ``groups`` (one patient id per case)
    resamples patients with all their cases; without it every case is its own patient. Resamples missing a class of
    ``labels`` are redrawn, so an AUROC is always defined."""
    labels = np.asarray(labels)
    if groups is None:
        members = [np.array([index]) for index in range(len(labels))]
    else:
        groups = np.asarray(groups)
        if len(groups) != len(labels):
            raise ValueError(f"groups has {len(groups)} entries for {len(labels)} cases; give one per case.")
        members = [np.flatnonzero(groups == group) for group in dict.fromkeys(groups.tolist())]
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    values = []
    while len(values) < num_resamples:
        index = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if len(np.unique(labels[index])) == len(classes):
            values.append(metric(index))
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    value = metric(np.arange(len(labels)))
    return {"value": float(value), "low": float(low), "high": float(high), "n": len(members)}


def delta_auroc_ci(
    probabilities: torch.Tensor | np.ndarray,
    reference_probabilities: torch.Tensor | np.ndarray,
    labels: Sequence[int] | torch.Tensor,
    num_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence | None = None,
) -> dict[str, float]:
    """Macro-AUROC of ``probabilities`` minus that of ``reference_probabilities`` on the same cases, with a paired
    bootstrap CI (MediSyn's ΔAUROC): ``{"delta", "low", "high", "n"}``; ``groups`` resamples patients, see
    :func:`bootstrap_metric_ci`."""
    probabilities, reference_probabilities = np.asarray(probabilities), np.asarray(reference_probabilities)
    labels = np.asarray(labels)
    if probabilities.shape != reference_probabilities.shape:
        raise ValueError(
            f"both models must score the same cases: {probabilities.shape} vs {reference_probabilities.shape}."
        )

    def delta(index: np.ndarray) -> float:
        return macro_auroc(probabilities[index], labels[index]) - macro_auroc(
            reference_probabilities[index], labels[index]
        )

    ci = bootstrap_metric_ci(delta, labels, groups, num_resamples, level, seed)
    return {"delta": ci.pop("value"), **ci}


def class_matched_indices(labels: Sequence[int], per_class: int | Mapping[int, int], seed: int = 0) -> list[int]:
    """Indices drawing ``per_class`` items of every class (a count, or ``{class: count}`` to copy another arm's
    histogram) without replacement, so compared arms have the same class histogram.

    Raises:
        ValueError: a class has fewer items than asked.
    """
    labels = np.asarray(labels)
    wanted = per_class if isinstance(per_class, Mapping) else {int(c): int(per_class) for c in np.unique(labels)}
    rng = np.random.default_rng(seed)
    chosen = []
    for cls, count in sorted(wanted.items()):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < count:
            raise ValueError(f"class {cls} has {len(pool)} items, {count} were asked for.")
        chosen.extend(rng.choice(pool, size=int(count), replace=False).tolist())
    return sorted(chosen)


def mix_training_items(
    real: Sequence, synthetic: Sequence, mode: str = "concat", ratio: float = 1.0, seed: int = 0
) -> list:
    """A training set of real and synthetic items.

    - ``"concat"``: all real items plus ``round(ratio * len(real))`` synthetic ones (ratio 1: as many as real);
    - ``"replace"``: ``round(ratio * len(real))`` real items swapped for synthetic ones, the size unchanged.

    Raises:
        ValueError: unknown mode, a ratio out of range, or too few synthetic items (nothing is silently dropped).
    """
    if mode not in MIXING_MODES:
        raise ValueError(f"unknown mixing mode '{mode}'; choose one of {list(MIXING_MODES)}.")
    if ratio < 0 or (mode == "replace" and ratio > 1):
        raise ValueError(f"ratio must be >= 0 (and <= 1 to replace), got {ratio} for '{mode}'.")
    count = round(ratio * len(real))
    if count > len(synthetic):
        raise ValueError(f"'{mode}' at ratio {ratio} needs {count} synthetic items, only {len(synthetic)} given.")
    rng = np.random.default_rng(seed)
    drawn = [synthetic[i] for i in sorted(rng.choice(len(synthetic), size=count, replace=False).tolist())]
    if mode == "concat":
        return [*real, *drawn]
    kept = sorted(rng.choice(len(real), size=len(real) - count, replace=False).tolist())
    return [*(real[i] for i in kept), *drawn]


def patient_folds(groups: Sequence, num_folds: int, seed: int = 0) -> list[list[int]]:
    """Item indices of each fold of a ``num_folds``-fold cross-validation split at the patient level: every patient's
    items (``groups[i]`` names item ``i``'s patient) fall in one fold; patients are shuffled with ``seed`` and dealt
    round-robin, so fold sizes differ by at most one patient.

    Raises:
        ValueError: fewer than 2 folds, or fewer patients than folds.
    """
    patients = list(dict.fromkeys(str(group) for group in groups))
    if num_folds < 2 or len(patients) < num_folds:
        raise ValueError(
            f"{num_folds}-fold cross-validation needs num_folds >= 2 and as many patients; got {len(patients)}."
        )
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[p]: rank % num_folds for rank, p in enumerate(order)}
    return [[i for i, group in enumerate(groups) if fold_of[str(group)] == fold] for fold in range(num_folds)]


def patch_mask(
    batch: int,
    height: int,
    width: int,
    alpha: float,
    patch_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """EMIT-Diff's random patch mask ``m`` ``[B, 1, H, W]`` (bool, True = real; paper S2:L143-147): U(0, 1) on a
    ``ceil(H / p) x ceil(W / p)`` grid per image, cells below ``alpha`` are real, nearest-upsampled to ``H x W``. Each
    cell is real with probability ``alpha``; ``patch_size`` ``p`` >= H, W chooses whole images, 1 single pixels."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the probability of a real patch) must be in [0, 1], got {alpha}.")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1 pixel, got {patch_size}.")
    rows, columns = math.ceil(height / patch_size), math.ceil(width / patch_size)
    device = generator.device if generator is not None else "cpu"
    cells = torch.rand(batch, 1, rows, columns, generator=generator, device=device) < alpha
    return cells.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)[..., :height, :width]


def patch_mix(
    real: torch.Tensor, synthetic: torch.Tensor, alpha: float, patch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """EMIT-Diff's patch mixing ``m * x_0 + (1 - m) * x_i`` of real images ``x_0`` and synthetic counterparts ``x_i``
    (generated from the real image's mask, so its label stays right), both ``[B, C, H, W]``, with ``m`` from
    :func:`patch_mask`: ``alpha`` is the probability that a patch is real (1 all real, 0 all synthetic)."""
    if real.shape != synthetic.shape or real.ndim != 4:
        raise ValueError(
            f"real and synthetic must both be [B, C, H, W], got {tuple(real.shape)} and {tuple(synthetic.shape)}."
        )
    batch, _, height, width = real.shape
    mask = patch_mask(batch, height, width, alpha, patch_size, generator).to(real.device)
    return torch.where(mask, real, synthetic)
