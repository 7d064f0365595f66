"""Evaluation of label-map generators: sample groups, lesion presence and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen_common.label_evaluation import (
    MIN_LESION_VOXELS,
    SampleCollector,
    label_generator_report,
    lesion_presence,
    lesion_size_conditions,
    make_evaluation_specs,
)
from medgen_common.transforms import normalise_probabilities

LESIONS = ["wmh", "tumour", "oedema", "enhancing"]
GROUPS = {"wmh": ["wmh"], "tumour": ["tumour", "oedema", "enhancing"]}


def test_evaluation_groups_request_co_occurring_lesions_in_the_upper_half():
    specs = make_evaluation_specs(5, seed=3, lesion_names=LESIONS, lesion_groups=GROUPS)
    assert [s["group"] for s in specs] == ["no_lesion"] * 5 + ["wmh_large"] * 5 + ["tumour_large"] * 5
    assert len({s["seed"] for s in specs}) == 15
    conditions = {g: np.concatenate([s["lesion_size_condition"] for s in specs if s["group"] == g]) for g in ("no_lesion", "wmh_large", "tumour_large")}
    assert np.all(conditions["no_lesion"] == 0)
    assert np.all(conditions["wmh_large"][:, 0] >= 0.5) and np.all(conditions["wmh_large"][:, 1:] == 0)
    assert np.all(conditions["tumour_large"][:, 1:] >= 0.5) and np.all(conditions["tumour_large"][:, 0] == 0)
    assert specs[0]["lesion_size_condition"].shape == (1, 4)


def test_matched_group_draws_conditions_of_training_maps():
    training_conditions = [np.array([[0.1, 0.0, 0.0, 0.0]], np.float32), np.array([[0.0, 0.6, 0.8, 0.2]], np.float32)]
    specs = make_evaluation_specs(5, seed=1, lesion_names=LESIONS, lesion_groups=GROUPS, training_conditions=training_conditions, num_matched=20)
    assert [s["group"] for s in specs[:20]] == ["matched"] * 20 and len({s["seed"] for s in specs}) == 35
    drawn = {tuple(s["lesion_size_condition"].ravel().tolist()) for s in specs[:20]}
    assert drawn == {tuple(c.ravel().tolist()) for c in training_conditions}  # both drawn in 20 tries (p ~ 2e-6)
    with pytest.raises(ValueError, match="empty"):
        make_evaluation_specs(2, 0, LESIONS, GROUPS, training_conditions=[])


def test_lesion_size_conditions_of_maps_use_the_training_maxima():
    label = torch.zeros(6, 4, 4)
    label[0] = 1.0
    label[:, 0, :2] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])[:, None]  # 2 voxels of wmh
    statistics = {"lesion_channel_indices": [2, 3, 4, 5], "lesion_volume_max": [4.0, 10.0, 10.0, 0.0]}
    (condition,) = lesion_size_conditions([label], statistics)
    assert condition.shape == (1, 4) and np.allclose(condition, [[0.5, 0.0, 0.0, 0.0]])


def test_unknown_lesion_in_a_group_is_rejected():
    with pytest.raises(ValueError, match=r"\['necrosis'\]"):
        make_evaluation_specs(1, 0, LESIONS, {"tumour": ["necrosis"]})


def test_lesion_presence_needs_enough_argmax_voxels():
    label = torch.zeros(3, 8, 8)
    label[0] = 1.0
    label[:, 0, :MIN_LESION_VOXELS - 1] = torch.tensor([0.0, 0.0, 1.0])[:, None]
    assert not lesion_presence(label, 2)
    label[:, 1, 0] = torch.tensor([0.2, 0.3, 0.5])
    assert lesion_presence(label, 2)


def _maps(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [normalise_probabilities(torch.softmax(torch.randn(6, 12, 12, generator=generator) * 4, 0), False) for _ in range(count)]


class _IdentityAutoencoder(torch.nn.Module):
    def reconstruct(self, x):
        return torch.log(x.clamp_min(1e-6))  # softmax gives x back


def test_report_measures_fractions_presence_dice_and_copying(tmp_path):
    training, holdout = _maps(10, 0), _maps(4, 1)
    collector = SampleCollector()
    collector.predictions = [m.clone() for m in training[:4]]  # a generator that copies training maps
    collector.batch_values = {"group": ["no_lesion", "no_lesion", "tumour_large", "tumour_large"],
                              "lesion_size_condition": [torch.zeros(1, 4)] * 2 + [torch.full((1, 4), 0.7)] * 2}  # fmt: skip
    statistics = {
        "channels": ["background", "csf", "wmh", "tumour", "oedema", "enhancing"], "lesions": LESIONS,
        "lesion_channel_indices": [2, 3, 4, 5], "lesion_volume_max": [20.0, 20.0, 20.0, 20.0],
        "mean_tissue_fraction": {n: 0.2 for n in ["background", "csf", "wmh", "tumour", "oedema", "enhancing"]},
    }  # fmt: skip
    report = label_generator_report(collector, statistics, training, holdout, _IdentityAutoencoder(), tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    assert report["groups"] == {"no_lesion": 2, "tumour_large": 2}
    assert report["tissue_fraction_group"] == "all"
    assert report["memorisation"]["median_nn_mse_samples_to_training"] == 0.0 and report["memorisation"]["ratio"] == 0.0
    assert all(v == pytest.approx(1.0) for v in report["autoencoder_dice"].values() if v == v)
    expected = float(np.mean([lesion_presence(m, 3) for m in training[2:4]]))
    assert report["lesion_presence_rate"]["tumour_large"]["tumour"] == expected


def test_tissue_fractions_come_from_the_matched_group_when_there_is_one(tmp_path):
    training, holdout = _maps(6, 0), _maps(2, 1)
    csf_only = torch.zeros(6, 12, 12)
    csf_only[1] = 1.0
    collector = SampleCollector()
    collector.predictions = [csf_only, csf_only, training[0].clone()]
    collector.batch_values = {"group": ["matched", "matched", "tumour_large"], "lesion_size_condition": [torch.zeros(1, 4)] * 3}
    statistics = {
        "channels": ["background", "csf", "wmh", "tumour", "oedema", "enhancing"], "lesions": LESIONS,
        "lesion_channel_indices": [2, 3, 4, 5], "lesion_volume_max": [20.0, 20.0, 20.0, 20.0],
        "mean_tissue_fraction": {n: 0.2 for n in ["background", "csf", "wmh", "tumour", "oedema", "enhancing"]},
    }  # fmt: skip
    report = label_generator_report(collector, statistics, training, holdout, _IdentityAutoencoder(), tmp_path / "r.json")
    assert report["tissue_fraction_group"] == "matched"
    assert report["tissue_fraction"]["csf"]["samples"] == pytest.approx(1.0)
    assert report["tissue_fraction"]["wmh"]["samples"] == 0.0
