"""Evaluation of label-map generators (brainSPADE label LDM): do samples look like the training maps in bulk,
do they follow the requested lesion sizes, does the autoencoder reconstruct held-out maps, and do samples copy
training maps?

The ``evaluate`` workflow samples groups of label maps with fixed lesion conditions, collects them with
:class:`SampleCollector` and writes :func:`label_generator_report` as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from .handlers import values_of
from .label_statistics import tissue_fractions
from .metrics import mean_dice_by_class, nearest_neighbour_distances
from .transforms import LesionSizeConditiond
from .writers import write_json

__all__ = [
    "lesion_size_conditions",
    "make_evaluation_specs",
    "SampleCollector",
    "lesion_presence",
    "label_generator_report",
]

# the group whose conditions are drawn from the training maps: its tissue fractions are compared with training
MATCHED_GROUP = "matched"


def lesion_size_conditions(maps: Sequence[torch.Tensor], label_statistics: dict) -> list[np.ndarray]:
    """The lesion-size condition ``[1, L]`` (chapter Eq. 1.3) of each ``[C, *spatial]`` map, with the training
    statistics' channel indices and maxima."""
    condition = LesionSizeConditiond("label", label_statistics["lesion_channel_indices"], label_statistics["lesion_volume_max"])
    return [condition({"label": m})["lesion_size_condition"].numpy().astype(np.float32) for m in maps]

# a lesion counts as present when at least this many voxels have it as their most probable class
MIN_LESION_VOXELS = 3


def make_evaluation_specs(
    num_per_group: int,
    seed: int,
    lesion_names: Sequence[str],
    lesion_groups: Mapping[str, Sequence[str]],
    training_conditions: Sequence[np.ndarray] | None = None,
    num_matched: int | None = None,
) -> list[dict]:
    """Sample specifications in groups:

    - ``"matched"`` (only when ``training_conditions`` are given; ``num_matched`` samples, default
      ``num_per_group``): conditions drawn with replacement from the training maps' own conditions, so the samples
      should match the training set in bulk (tissue fractions, which vary a lot between slice levels: use more
      samples here);
    - ``"no_lesion"``: all dc 0;
    - per lesion group (lesions that occur together, e.g. ``{"tumour": ["tumour", "oedema", "enhancing"]}``),
      ``"<group>_large"``: each of its lesions' dc drawn from U(0.5, 1), the upper half of the normalised range,
      every other lesion at 0.

    Each spec is ``{"seed", "group", "lesion_size_condition": float32 [1, L]}``; seeds are distinct across groups.
    """
    unknown = sorted({name for members in lesion_groups.values() for name in members} - set(lesion_names))
    if unknown:
        raise ValueError(f"lesion groups name {unknown}, which are not among the lesions {list(lesion_names)}.")
    rng = np.random.default_rng(seed)
    groups = [("no_lesion", [])] + [(f"{group}_large", list(members)) for group, members in lesion_groups.items()]
    if training_conditions is not None:
        if len(training_conditions) == 0:
            raise ValueError("training_conditions is empty: give the conditions of at least one training map.")
        groups.insert(0, (MATCHED_GROUP, None))
    specs = []
    for group_index, (group, members) in enumerate(groups):
        for item in range(num_per_group if members is not None or num_matched is None else num_matched):
            if members is None:
                drawn = training_conditions[int(rng.integers(len(training_conditions)))]
                condition = np.asarray(drawn, dtype=np.float32).reshape(1, len(lesion_names))
            else:
                condition = np.zeros((1, len(lesion_names)), dtype=np.float32)
                for name in members:
                    condition[0, list(lesion_names).index(name)] = rng.uniform(0.5, 1.0)
            specs.append({"seed": seed + len(specs), "group": group, "lesion_size_condition": condition})
    return specs


class SampleCollector:
    """Ignite handler keeping every prediction (CPU) with the batch fields named in ``batch_keys``."""

    def __init__(self, batch_keys: Sequence[str] = ("group", "lesion_size_condition")):
        self.batch_keys = list(batch_keys)
        self.predictions: list[torch.Tensor] = []
        self.batch_values: dict[str, list] = {key: [] for key in self.batch_keys}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)

    def _collect(self, engine: Engine) -> None:
        self.predictions.extend(torch.as_tensor(p).detach().cpu().float() for p in values_of(engine.state.output))
        for key in self.batch_keys:
            values = values_of(engine.state.batch, key)  # the evaluator may have decollated the batch
            self.batch_values[key].extend(torch.as_tensor(v).cpu() if not isinstance(v, str) else v for v in values)


def lesion_presence(label: torch.Tensor, channel_index: int, min_voxels: int = MIN_LESION_VOXELS) -> bool:
    """Whether at least ``min_voxels`` voxels of a ``[C, *spatial]`` map have ``channel_index`` as their argmax."""
    return int((label.argmax(0) == channel_index).sum()) >= min_voxels


def _stack(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(m).float() for m in maps])


def label_generator_report(
    collector: SampleCollector,
    label_statistics: dict,
    training_maps: Sequence[torch.Tensor],
    holdout_maps: Sequence[torch.Tensor],
    autoencoder: torch.nn.Module,
    report_path: str | Path,
    device: torch.device | str = "cpu",
) -> dict:
    """Measure a label generator and write the JSON report.

    Args:
        collector: samples ``[C, *spatial]`` with their ``group`` and ``lesion_size_condition``.
        label_statistics: training-set statistics (:func:`~medgen_common.label_statistics.compute_label_statistics`).
        training_maps: real training label maps ``[C, *spatial]`` (memorisation reference).
        holdout_maps: held-out real maps ``[C, *spatial]``: autoencoder Dice and the memorisation baseline.
        autoencoder: the trained ``AutoencoderKL``.
        report_path: where the JSON goes.

    Report keys: ``tissue_fraction`` (sample vs training mean per channel and relative difference, over the
    ``"matched"`` group when there is one, else over all samples; ``tissue_fraction_group`` says which),
    ``lesion_presence_rate`` per group and lesion, ``lesion_volume_vs_condition`` (Pearson r between requested dc
    and sampled soft volume / training max, per lesion, over all samples),
    ``autoencoder_dice`` per channel on held-out maps, ``memorisation`` (median nearest-neighbour distance of samples
    and of held-out maps to the training set, and their ratio).
    """
    channels, lesions = label_statistics["channels"], label_statistics["lesions"]
    lesion_indices = label_statistics["lesion_channel_indices"]
    samples = _stack(collector.predictions)
    groups = [str(g) for g in collector.batch_values["group"]]
    conditions = torch.stack([torch.as_tensor(c).reshape(-1) for c in collector.batch_values["lesion_size_condition"]])

    fraction_group = MATCHED_GROUP if MATCHED_GROUP in groups else "all"
    fraction_samples = [s for s, g in zip(samples, groups) if fraction_group in ("all", g)]
    sample_fractions = np.stack([tissue_fractions(s.numpy()) for s in fraction_samples]).mean(0)
    tissue = {}
    for index, name in enumerate(channels[1:], start=1):
        reference = label_statistics["mean_tissue_fraction"][name]
        tissue[name] = {
            "samples": float(sample_fractions[index]),
            "training": reference,
            "relative_difference": float(abs(sample_fractions[index] - reference) / reference) if reference > 0 else None,
        }

    presence: dict[str, dict[str, float]] = {}
    for group in sorted(set(groups)):
        members = [s for s, g in zip(samples, groups) if g == group]
        presence[group] = {name: float(np.mean([lesion_presence(m, i) for m in members])) for name, i in zip(lesions, lesion_indices)}

    volume_max = np.asarray(label_statistics["lesion_volume_max"], dtype=float)
    sampled_dc = samples[:, lesion_indices].flatten(2).sum(2).numpy() / np.where(volume_max > 0, volume_max, np.inf)
    correlation = {}
    for column, name in enumerate(lesions):
        requested, obtained = conditions.numpy()[:, column], sampled_dc[:, column]
        valid = requested.std() > 0 and obtained.std() > 0
        correlation[name] = {
            "pearson_r": float(np.corrcoef(requested, obtained)[0, 1]) if valid else None,
            "mean_requested": float(requested.mean()),
            "mean_obtained": float(obtained.mean()),
        }

    holdout = _stack(holdout_maps)
    autoencoder.eval()
    with torch.no_grad():
        reconstructions = torch.cat(
            [torch.softmax(autoencoder.reconstruct(batch.to(device)), 1).cpu() for batch in holdout.split(8)]
        )
    dice = mean_dice_by_class(reconstructions, holdout, include_background=False)
    training = _stack(training_maps)
    distances, _ = nearest_neighbour_distances(samples, training, metric="mse")
    holdout_distances, _ = nearest_neighbour_distances(holdout, training, metric="mse")

    report = {
        "num_samples": len(samples),
        "groups": {group: groups.count(group) for group in sorted(set(groups))},
        "min_lesion_voxels": MIN_LESION_VOXELS,
        "tissue_fraction_group": fraction_group,
        "tissue_fraction": tissue,
        "lesion_presence_rate": presence,
        "lesion_volume_vs_condition": correlation,
        "autoencoder_dice": {channels[index]: value for index, value in dice.items()},
        "memorisation": {
            "median_nn_mse_samples_to_training": float(np.median(distances)),
            "median_nn_mse_holdout_to_training": float(np.median(holdout_distances)),
            # as metrics.memorisation_ratio: ~1 healthy, << 1 suggests copying (undefined if holdout duplicates training)
            "ratio": float(np.median(distances) / np.median(holdout_distances)) if np.median(holdout_distances) > 0 else None,
        },
    }
    write_json(report, report_path)
    return report
