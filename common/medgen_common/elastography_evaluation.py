"""Clinical evaluation of virtual strain elastograms (V-EUS, chapter 8): decode the colours to the 64-level strain
bar, then the strain ratio's diagnostic AUC and agreement, the chapter's image metrics (Eqs. 8.6-8.8), colour-index
errors and a Tsukuba-like score.

Elastograms are RGB ``[3, H, W]`` in [0, 1]; masks ``[H, W]`` (lesion > 0); palette indices 0 (hard, blue) to 63.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage
from scipy import stats
from skimage.color import rgb2hsv

from .downstream_statistics import roc_auc
from .elastography import NUM_LEVELS, lesion_ring, rgb_to_index, strain_ratio
from .metrics import psnr
from .writers import write_csv, write_json

__all__ = [
    "global_ssim",
    "mape",
    "histogram_correlation",
    "strain_score",
    "roc_auc",
    "tsukuba_score",
    "weighted_kappa",
    "virtual_elastography_cases",
    "elastography_report",
]

HARD_INDEX = 21  # indices below it (the blue third of the bar) count as hard in the Tsukuba-like score


def _array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def global_ssim(a, b, data_range: float = 1.0) -> float:
    """Unwindowed SSIM over all pixels and channels of two images in [0, ``data_range``] (Eq. 8.6, with C2 in the
    contrast term where the chapter prints C1)."""
    a, b = _array(a).astype(np.float64).ravel(), _array(b).astype(np.float64).ravel()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean_a, mean_b = a.mean(), b.mean()
    covariance = ((a - mean_a) * (b - mean_b)).mean()
    return float((2 * mean_a * mean_b + c1) * (2 * covariance + c2) / ((mean_a**2 + mean_b**2 + c1) * (a.var() + b.var() + c2)))


def mape(real_scores: Sequence[float], virtual_scores: Sequence[float]) -> float:
    """Mean absolute percentage error as a fraction (Eq. 8.7): mean(|real - virtual| / real); real scores > 0."""
    real, virtual = np.asarray(real_scores, dtype=np.float64), np.asarray(virtual_scores, dtype=np.float64)
    if real.shape != virtual.shape or real.size == 0:
        raise ValueError(f"need two equally long, non-empty score lists, got {real.shape} and {virtual.shape}.")
    if np.any(real <= 0):
        raise ValueError("real scores must be > 0 for a percentage error.")
    return float(np.mean(np.abs(real - virtual) / real))


def histogram_correlation(real_rgb, virtual_rgb, bins: int = 32) -> float:
    """Colour-histogram correlation (Eq. 8.8, sqrt corrected): 1 - Bhattacharyya distance between the HSV hue
    histograms, and between the saturation histograms, averaged (CHC)."""
    real_hsv = rgb2hsv(np.moveaxis(_array(real_rgb), 0, -1).clip(0, 1))
    virtual_hsv = rgb2hsv(np.moveaxis(_array(virtual_rgb), 0, -1).clip(0, 1))
    scores = []
    for channel in (0, 1):
        p = np.histogram(real_hsv[..., channel], bins, (0.0, 1.0))[0].astype(np.float64)
        q = np.histogram(virtual_hsv[..., channel], bins, (0.0, 1.0))[0].astype(np.float64)
        coefficient = np.sqrt(p * q).sum() / math.sqrt(p.sum() * q.sum())
        scores.append(1.0 - math.sqrt(max(1.0 - coefficient, 0.0)))
    return float(np.mean(scores))


def strain_score(index, mask) -> float:
    """Mean hardness ``64 - index`` over the lesion (the authors' colour-bar score; blue = 64, dark red = 1)."""
    index, mask = _array(index), _array(mask) > 0
    if not mask.any():
        raise ValueError("the lesion mask is empty.")
    return float((NUM_LEVELS - index[mask]).mean())


def tsukuba_score(index, mask, inner_px: int = 0, outer_px: int = 4) -> int:
    """Tsukuba-like 5-point elasticity score from a decoded map (spec section 7.5), with ``f_in`` / ``f_out`` the
    hard fraction (index < 21) in the lesion / in a ring ``inner_px``-``outer_px`` outside it: 1 f_in < 0.1; 2 < 0.5
    (mosaic); 3 < 0.8; 4 f_in >= 0.8 with f_out < 0.5; 5 hardness beyond the lesion."""
    index, mask = _array(index), _array(mask) > 0
    if not mask.any():
        raise ValueError("the lesion mask is empty.")
    hard = index < HARD_INDEX
    inside = hard[mask].mean()
    if inside < 0.1:
        return 1
    if inside < 0.5:
        return 2
    if inside < 0.8:
        return 3
    ring = lesion_ring(mask, inner_px, outer_px)
    return 5 if ring.any() and hard[ring].mean() >= 0.5 else 4


def weighted_kappa(a: Sequence[int], b: Sequence[int], num_categories: int = 5, weights: str = "quadratic") -> float:
    """Cohen's kappa of two ratings on 1..``num_categories`` with ``"quadratic"`` or ``"linear"`` weights."""
    a, b = np.asarray(a, dtype=int) - 1, np.asarray(b, dtype=int) - 1
    if a.shape != b.shape or a.size == 0 or min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= num_categories:
        raise ValueError(f"need two equally long lists of ratings in 1..{num_categories}.")
    observed = np.zeros((num_categories, num_categories))
    np.add.at(observed, (a, b), 1.0)
    expected = np.outer(observed.sum(1), observed.sum(0)) / a.size
    distance = np.abs(np.subtract.outer(np.arange(num_categories), np.arange(num_categories)))
    weight = distance**2 if weights == "quadratic" else distance
    denominator = (weight * expected).sum()
    return 1.0 if denominator == 0 else float(1.0 - (weight * observed).sum() / denominator)


def _load_channel_first(path: str) -> torch.Tensor:
    """A channel-last NIfTI file (H x W x C) as ``[C, H, W]`` float; refuses NaN or Inf naming the file."""
    array = torch.as_tensor(np.asarray(LoadImage(image_only=True)(path)), dtype=torch.float32)
    array = array.movedim(-1, 0) if array.ndim == 3 else array[None]
    if not torch.isfinite(array).all():
        raise ValueError(f"'{path}' holds NaN or Inf values.")
    return array


@torch.no_grad()
def virtual_elastography_cases(
    generator: torch.nn.Module, entries: Sequence[Mapping], device: torch.device | str = "cpu",
    bmode_key: str = "bmode", batch_size: int = 16,
) -> list[dict]:  # fmt: skip
    """Run the generator in eval mode (no dropout noise, BatchNorm running statistics) on datalist entries holding
    ``bmode_key``, ``elastogram`` and ``mask`` files (channel-last NIfTI in [0, 1]) and ``malignant``; return the
    case dicts :func:`elastography_report` reads."""
    generator.eval()
    cases = []
    for start in range(0, len(entries), batch_size):
        batch = entries[start : start + batch_size]
        bmodes = torch.stack([_load_channel_first(entry[bmode_key]) for entry in batch])
        virtual = (generator(bmodes.to(device) * 2.0 - 1.0).float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
        for entry, bmode, rgb in zip(batch, bmodes, virtual):
            cases.append({
                "case": str(entry.get("case", Path(entry[bmode_key]).name)), "bmode": bmode, "virtual": rgb,
                "real": _load_channel_first(entry["elastogram"]), "mask": _load_channel_first(entry["mask"])[0] > 0,
                "malignant": int(entry["malignant"]),
            })  # fmt: skip
    return cases


def _case_scores(case: Mapping) -> dict:
    name = case["case"]
    real, virtual, mask = _array(case["real"]), _array(case["virtual"]), _array(case["mask"]) > 0
    if not (np.isfinite(real).all() and np.isfinite(virtual).all()):
        raise ValueError(f"case '{name}': the elastograms hold NaN or Inf values.")
    if not mask.any():
        raise ValueError(f"case '{name}': the lesion mask is empty, so no strain ratio can be measured.")
    real_index, virtual_index = rgb_to_index(real), rgb_to_index(virtual)
    sr_real, sr_virtual = strain_ratio(real_index, mask), strain_ratio(virtual_index, mask)
    error = np.abs(real_index.astype(np.int64) - virtual_index)
    return {
        "case": name, "malignant": int(case["malignant"]), "sr_real": sr_real, "sr_virtual": sr_virtual,
        "strain_score_real": strain_score(real_index, mask), "strain_score_virtual": strain_score(virtual_index, mask),
        "tsukuba_real": tsukuba_score(real_index, mask), "tsukuba_virtual": tsukuba_score(virtual_index, mask),
        "ssim": global_ssim(real, virtual), "psnr": float(psnr(torch.as_tensor(virtual)[None], torch.as_tensor(real)[None], 1.0)),
        "chc": histogram_correlation(real, virtual), "lesion_index_mae": float(error[mask].mean()),
        "image_index_mae": float(error.mean()), "sign_agrees": int((sr_real > 1.0) == (sr_virtual > 1.0)),
    }  # fmt: skip


def elastography_report(cases: Sequence[Mapping], output_dir: str | Path) -> dict:
    """Score every case, write ``per_case.csv`` and ``summary.json`` into ``output_dir`` and return the summary.

    Each case: ``case`` (name), ``real`` and ``virtual`` RGB ``[3, H, W]`` in [0, 1], ``mask`` ``[H, W]`` and
    ``malignant`` (0/1). The summary holds the SR AUC (malignant vs rest) from the virtual and from the real
    elastograms, the Spearman rho between virtual and real SR, sign accuracy (lesion stiffer than its ring or not),
    MAPE of SR and of the strain score (fractions), mean SSIM, CHC, PSNR (an additional metric), colour-index errors
    (lesion and whole image, 0-63 scale) and the quadratic-weighted kappa of the Tsukuba-like scores.

    Raises:
        ValueError: no cases, or a case with an empty lesion mask or non-finite values (naming it).
    """
    if not cases:
        raise ValueError("no cases to evaluate.")
    rows = [_case_scores(case) for case in cases]
    column = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in rows[0] if key != "case"}
    labels = column["malignant"].astype(int)
    both_classes = 0 < labels.sum() < len(labels)
    summary = {
        "num_cases": len(rows),
        "sr_auc_virtual": roc_auc(column["sr_virtual"], labels) if both_classes else None,
        "sr_auc_real": roc_auc(column["sr_real"], labels) if both_classes else None,
        "sr_spearman": float(stats.spearmanr(column["sr_real"], column["sr_virtual"]).statistic) if len(rows) > 2 else None,
        "sign_accuracy": float(column["sign_agrees"].mean()),
        "sr_mape": mape(column["sr_real"], column["sr_virtual"]),
        "strain_score_mape": mape(column["strain_score_real"], column["strain_score_virtual"]),
        "ssim": float(column["ssim"].mean()),
        "chc": float(column["chc"].mean()),
        "psnr": float(column["psnr"].mean()),
        "lesion_index_mae": float(column["lesion_index_mae"].mean()),
        "image_index_mae": float(column["image_index_mae"].mean()),
        "tsukuba_kappa": weighted_kappa(column["tsukuba_real"], column["tsukuba_virtual"]),
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(output_dir / "per_case.csv", list(rows[0]), rows)
    write_json(summary, output_dir / "summary.json")
    return summary
