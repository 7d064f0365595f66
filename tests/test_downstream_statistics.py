"""Statistics of synthetic-data utility studies: bootstrap CIs, AUROC, class matching, mixing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medgen_common.downstream_statistics import (
    auroc,
    bootstrap_difference_ci,
    bootstrap_mean_ci,
    class_matched_indices,
    delta_auroc_ci,
    macro_auroc,
    mix_training_items,
    patch_mask,
    patch_mix,
    patient_folds,
)


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_patients():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.8, 0.05, 10), rng.normal(0.8, 0.05, 200)
    ci_small, ci_large = bootstrap_mean_ci(small), bootstrap_mean_ci(large)
    for ci, values in ((ci_small, small), (ci_large, large)):
        assert ci["low"] < ci["mean"] < ci["high"] and ci["mean"] == pytest.approx(values.mean())
    assert ci_large["high"] - ci_large["low"] < ci_small["high"] - ci_small["low"]
    assert bootstrap_mean_ci([0.5, math.nan, 0.7])["n"] == 2


def test_difference_of_identical_scores_is_exactly_zero():
    scores = {f"p{i}": 0.5 + 0.01 * i for i in range(12)}
    ci = bootstrap_difference_ci(scores, dict(scores))
    assert (ci["mean"], ci["low"], ci["high"]) == (0.0, 0.0, 0.0)


def test_difference_is_paired_over_shared_patients():
    reference = {"a": 0.5, "b": 0.6, "c": 0.7}
    better = {"a": 0.6, "b": 0.7, "c": 0.8, "d": 0.1}  # "d" has no reference: left out
    ci = bootstrap_difference_ci(better, reference)
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.1) and ci["low"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="share no patient"):
        bootstrap_difference_ci({"x": 1.0}, reference)


def test_auroc_matches_known_values_and_handles_ties():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # the classic sklearn example
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_macro_auroc_averages_one_vs_rest():
    labels = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[labels]
    assert macro_auroc(perfect, labels) == 1.0
    assert macro_auroc(np.full((6, 3), 1 / 3), labels) == 0.5


def test_delta_auroc_of_identical_predictions_is_zero_with_a_zero_ci():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    probabilities = np.stack([1 - rng.random(50), rng.random(50)], 1)
    ci = delta_auroc_ci(probabilities, probabilities, labels, num_resamples=200)
    assert (ci["delta"], ci["low"], ci["high"]) == (0.0, 0.0, 0.0)


def test_delta_auroc_is_positive_for_a_better_model():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    good = np.stack([1 - labels + rng.normal(0, 0.3, 200), labels + rng.normal(0, 0.3, 200)], 1)
    poor = np.stack([1 - labels + rng.normal(0, 2.0, 200), labels + rng.normal(0, 2.0, 200)], 1)
    ci = delta_auroc_ci(good, poor, labels, num_resamples=300)
    assert ci["delta"] > 0 and ci["low"] > 0


def test_class_matching_gives_every_arm_the_same_histogram():
    labels_a = [0] * 30 + [1] * 10 + [2] * 25
    labels_b = [0] * 12 + [1] * 40 + [2] * 9
    histogram = {0: 8, 1: 5, 2: 9}
    arms = [np.asarray(labels)[class_matched_indices(labels, histogram, seed=3)] for labels in (labels_a, labels_b)]
    for arm in arms:
        assert np.bincount(arm).tolist() == [8, 5, 9]
    assert np.bincount(np.asarray(labels_b)[class_matched_indices(labels_b, 9)]).tolist() == [9, 9, 9]
    with pytest.raises(ValueError, match="class 2 has 9 items, 10 were asked"):
        class_matched_indices(labels_b, 10)


def test_mixing_modes_keep_or_swap_real_items():
    real, synthetic = [f"r{i}" for i in range(10)], [f"s{i}" for i in range(20)]
    mixed = mix_training_items(real, synthetic, "concat", 0.5)
    assert len(mixed) == 15 and set(real) <= set(mixed) and sum(x.startswith("s") for x in mixed) == 5
    swapped = mix_training_items(real, synthetic, "replace", 0.3)
    assert len(swapped) == 10 and sum(x.startswith("s") for x in swapped) == 3
    with pytest.raises(ValueError, match="needs 30 synthetic items, only 20"):
        mix_training_items(real, synthetic, "concat", 3.0)
    with pytest.raises(ValueError, match="unknown mixing mode"):
        mix_training_items(real, synthetic, "interleave")


def test_patch_mask_is_block_constant_and_real_with_probability_alpha():
    generator = torch.Generator().manual_seed(0)
    mask = patch_mask(400, 16, 16, 0.3, 4, generator)
    assert mask.shape == (400, 1, 16, 16) and mask.dtype == torch.bool
    cells = mask.view(400, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(400, 16, 16)
    assert torch.equal(cells.all(-1), cells.any(-1))  # every 4 x 4 cell is all real or all synthetic
    assert mask.float().mean().item() == pytest.approx(0.3, abs=0.02)
    whole = patch_mask(200, 16, 16, 0.5, 16, generator).flatten(1)
    assert torch.equal(whole.all(1), whole.any(1)) and 0 < whole.all(1).sum() < 200  # whole images chosen
    pixels = patch_mask(1, 32, 32, 0.5, 1, generator)
    assert torch.any(pixels[..., :-1] != pixels[..., 1:])  # neighbouring pixels differ: pixel-wise mixing
    assert patch_mask(2, 7, 9, 0.5, 4, generator).shape == (2, 1, 7, 9)  # sizes not a multiple of p are cropped
    with pytest.raises(ValueError, match="alpha"):
        patch_mask(1, 8, 8, 1.5, 4)


def test_patch_mix_takes_real_pixels_where_the_mask_is_one_and_synthetic_elsewhere():
    real, synthetic = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16) + 2
    mixed = patch_mix(real, synthetic, 0.5, 4, torch.Generator().manual_seed(5))
    mask = patch_mask(3, 16, 16, 0.5, 4, torch.Generator().manual_seed(5))
    assert torch.equal(mixed[mask.expand_as(mixed)], real[mask.expand_as(real)])
    assert torch.equal(mixed[~mask.expand_as(mixed)], synthetic[~mask.expand_as(synthetic)])
    assert torch.equal(patch_mix(real, synthetic, 1.0, 4), real)
    assert torch.equal(patch_mix(real, synthetic, 0.0, 4), synthetic)
    with pytest.raises(ValueError, match="both be"):
        patch_mix(real, synthetic[:2], 0.5, 4)


def test_delta_auroc_resamples_patients_when_given_groups():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(20), 5)
    labels = np.repeat(rng.integers(0, 2, 20), 5)
    # scores share a per-patient offset, as images of one patient do, so its five images are not five cases
    good = np.stack([1 - labels, labels + np.repeat(rng.normal(0, 0.5, 20), 5) + rng.normal(0, 0.1, 100)], 1)
    poor = np.stack([1 - labels, labels + np.repeat(rng.normal(0, 2.0, 20), 5) + rng.normal(0, 0.1, 100)], 1)
    by_case = delta_auroc_ci(good, poor, labels, num_resamples=400)
    by_patient = delta_auroc_ci(good, poor, labels, num_resamples=400, groups=patients)
    assert by_patient["delta"] == by_case["delta"] and (by_case["n"], by_patient["n"]) == (100, 20)
    # the patient-level interval is the honest, wider one
    assert by_patient["high"] - by_patient["low"] > by_case["high"] - by_case["low"]
    with pytest.raises(ValueError, match="one per case"):
        delta_auroc_ci(good, poor, labels, groups=patients[:10])


def test_patient_folds_are_disjoint_at_the_patient_level_and_cover_every_item():
    groups = [f"p{i // 3}" for i in range(30)] + ["p99"]  # 11 patients, one with a single item
    folds = patient_folds(groups, 3, seed=1)
    assert sorted(i for fold in folds for i in fold) == list(range(len(groups)))
    patients = [{groups[i] for i in fold} for fold in folds]
    assert all(not (a & b) for k, a in enumerate(patients) for b in patients[k + 1 :])
    assert sorted(len(p) for p in patients) == [3, 4, 4]
    assert patient_folds(groups, 3, seed=1) == folds and patient_folds(groups, 3, seed=2) != folds
    with pytest.raises(ValueError, match="3-fold cross-validation needs .* got 2"):
        patient_folds(["a", "a", "b"], 3)
