"""Tests of medgen_common.classification_utility: does a training set help a classifier on real test patients?

Toy data: 16 x 16 slices of noise; class 1 has a bright square at a random place. The "flipped" set swaps the
labels, so a classifier trained on it ranks the real test cases backwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen_common.classification_utility import (
    compare_classification_sets,
    format_classification_table,
    load_classification_set,
    train_classifier,
)
from medgen_common.writers import save_nifti

TRAINING = {"steps": 80, "batch_size": 16, "lr": 3e-3, "seed": 0, "channels": (4, 8), "num_resamples": 300}


def _items(seed: int, count: int, flip: bool = False, per_patient: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        label = index % 2
        image = rng.normal(0.3, 0.05, (16, 16)).astype(np.float32)
        if label:
            x, y = rng.integers(2, 10, 2)
            image[x : x + 5, y : y + 5] += 0.5
        patient = f"p{index // per_patient:03d}"
        items.append({"t2w": image, "lesion": (1 - label) if flip else label, "case": patient})
    return items


@pytest.fixture(scope="module")
def results() -> dict:
    test = _items(100, 48, per_patient=4)
    train_sets = {"real": _items(1, 96), "synthetic": _items(2, 96), "flipped": _items(3, 96, flip=True)}
    return compare_classification_sets(train_sets, test, "t2w", "lesion", group_key="case", **TRAINING)


def test_a_matched_set_classifies_real_patients_and_a_flipped_one_ranks_them_backwards(results):
    assert results["auroc"]["real"]["value"] > 0.95 and results["accuracy"]["real"]["value"] > 0.85
    assert results["auroc"]["synthetic"]["value"] > 0.95
    assert results["auroc"]["flipped"]["value"] < 0.1
    flipped = results["delta_auroc"]["flipped"]
    assert flipped["delta"] < -0.8 and flipped["high"] < 0  # clearly worse, CI excludes 0
    synthetic = results["delta_auroc"]["synthetic"]
    assert synthetic["low"] <= synthetic["delta"] <= synthetic["high"] and abs(synthetic["delta"]) < 0.05
    assert "real" not in results["delta_auroc"]
    # patients, not images, are resampled: 48 images of 12 patients
    assert results["auroc"]["real"]["n"] == 12 and results["test"] == {"items": 48, "patients": 12,
                                                                       "class_counts": {0: 24, 1: 24}}  # fmt: skip
    for name in ("real", "synthetic", "flipped"):
        ci = results["accuracy"][name]
        assert 0 <= ci["low"] <= ci["value"] <= ci["high"] <= 1


def test_table_lists_every_set_with_its_intervals(results):
    table = format_classification_table(results)
    assert "48 images of 12 patients" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| real", "| synthetic", "| flipped"]
    assert rows[0].endswith("| – |") and rows[2].count("[") == 3


def test_same_seed_gives_the_same_classifier():
    images, labels = load_classification_set(_items(4, 32), "t2w", "lesion", "set")
    first, second = (train_classifier(images, labels, 2, steps=10, seed=5, channels=(4, 8)) for _ in range(2))
    other = train_classifier(images, labels, 2, steps=10, seed=6, channels=(4, 8))
    assert all(torch.equal(w, second.state_dict()[k]) for k, w in first.state_dict().items())
    assert any(not torch.equal(w, other.state_dict()[k]) for k, w in first.state_dict().items())


def test_bad_items_are_refused_by_name(tmp_path):
    items = _items(5, 4)
    with pytest.raises(ValueError, match=r"training set 'real' item 0 misses key\(s\) \['lesion'\]"):
        load_classification_set([{"t2w": items[0]["t2w"]}], "t2w", "lesion", "training set 'real'")
    with pytest.raises(ValueError, match="item 1: 'lesion' must be a non-negative integer class, got 0.5"):
        load_classification_set([items[0], {**items[1], "lesion": 0.5}], "t2w", "lesion", "set")
    with pytest.raises(ValueError, match=r"item 1 has shape \(8, 8\), item 0 \(16, 16\)"):
        load_classification_set([items[0], {**items[1], "t2w": np.zeros((8, 8))}], "t2w", "lesion", "set")
    bad = items[2]["t2w"].copy()
    bad[0, 0] = np.nan
    path = save_nifti(bad[:, :, None], tmp_path / "bad.nii.gz", channel_first=False)
    with pytest.raises(ValueError, match=r"set item 0: 't2w' from '.*bad\.nii\.gz' contains NaN"):
        load_classification_set([{**items[2], "t2w": str(path)}], "t2w", "lesion", "set")
    with pytest.raises(ValueError, match="reference training set 'real' is not among"):
        compare_classification_sets({"synthetic": items}, items, "t2w", "lesion")
    with pytest.raises(ValueError, match="test set is empty"):
        compare_classification_sets({"real": items}, [], "t2w", "lesion")
