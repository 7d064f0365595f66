"""Statistics of a set of probabilistic label maps, computed once from the training split and stored as JSON.

They give the lesion-size condition its scale (the dataset maximum of chapter 1, Eq. 1.3), the ranges lesion
sizes are drawn from at sampling time, and the tissue fractions samples are compared against.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .datalist import load_datalist
from .writers import atomic_path

__all__ = ["compute_label_statistics", "load_or_compute_label_statistics", "tissue_fractions"]


def tissue_fractions(label: np.ndarray) -> np.ndarray:
    """Fraction of the foreground (non-background) mass in each channel of a ``[C, *spatial]`` map; entry 0 is 0."""
    mass = label.reshape(label.shape[0], -1).sum(1)
    foreground = max(float(mass[1:].sum()), 1e-8)
    fractions = mass / foreground
    fractions[0] = 0.0
    return fractions


def compute_label_statistics(
    label_paths: Sequence[str], channel_names: Sequence[str], lesion_names: Sequence[str]
) -> dict:
    """Read channel-last NIfTI label maps and summarise them.

    Returns a dict with ``num_maps``, ``channels``, ``lesions``, ``lesion_channel_indices``,
    ``lesion_volume_max`` (soft voxel sums, the dc denominators), ``lesion_presence_rate`` (fraction of maps with
    more than one voxel of soft volume), ``lesion_condition_low``/``_high`` (25th and 75th percentile of the
    non-zero dc values, 0 when a lesion never occurs) and ``mean_tissue_fraction`` per channel name.
    """
    missing = [name for name in lesion_names if name not in channel_names]
    if missing:
        raise ValueError(f"lesions {missing} are not among the label channels {list(channel_names)}.")
    lesion_indices = [list(channel_names).index(name) for name in lesion_names]
    volumes, fractions = [], []
    for path in label_paths:
        label = np.moveaxis(np.asarray(nib.load(path).dataobj, dtype=np.float32), -1, 0)
        if label.shape[0] != len(channel_names):
            raise ValueError(f"'{path}' has {label.shape[0]} channels, expected {len(channel_names)} ({list(channel_names)}).")
        label = label.reshape(label.shape[0], -1)
        volumes.append(label[lesion_indices].sum(1))
        fractions.append(tissue_fractions(label))
    if not volumes:
        raise ValueError("no label maps to summarise.")
    volumes, fractions = np.stack(volumes), np.stack(fractions)
    volume_max = volumes.max(0)
    conditions = volumes / np.where(volume_max > 0, volume_max, np.inf)
    low, high = [], []
    for column in conditions.T:
        present = column[column > 0]
        low.append(float(np.percentile(present, 25)) if present.size else 0.0)
        high.append(float(np.percentile(present, 75)) if present.size else 0.0)
    return {
        "num_maps": len(label_paths),
        "channels": list(channel_names),
        "lesions": list(lesion_names),
        "lesion_channel_indices": lesion_indices,
        "lesion_volume_max": volume_max.astype(float).tolist(),
        "lesion_presence_rate": (volumes > 1.0).mean(0).astype(float).tolist(),
        "lesion_condition_low": low,
        "lesion_condition_high": high,
        "mean_tissue_fraction": {name: float(f) for name, f in zip(channel_names, fractions.mean(0))},
    }


def load_or_compute_label_statistics(
    statistics_path: str | Path,
    datalist_path: str | Path,
    channel_names: Sequence[str],
    lesion_names: Sequence[str],
    label_key: str = "label",
    split: str = "training",
    recompute: bool = False,
) -> dict:
    """Return the statistics stored at ``statistics_path``, computing and writing them from the datalist's split
    when the file is absent (or ``recompute``). A stored file made for other channels is an error, not reused."""
    statistics_path = Path(statistics_path)
    if statistics_path.is_file() and not recompute:
        statistics = json.loads(statistics_path.read_text())
        if statistics.get("channels") != list(channel_names) or statistics.get("lesions") != list(lesion_names):
            raise ValueError(
                f"'{statistics_path}' was computed for channels {statistics.get('channels')} and lesions "
                f"{statistics.get('lesions')}, not {list(channel_names)} / {list(lesion_names)}; delete it or recompute."
            )
        return statistics
    entries = load_datalist(datalist_path, split=split, required_keys=(label_key,))
    statistics = compute_label_statistics([e[label_key] for e in entries], channel_names, lesion_names)
    statistics["datalist"] = str(datalist_path)
    with atomic_path(statistics_path) as temporary:
        temporary.write_text(json.dumps(statistics, indent=2))
    return statistics
