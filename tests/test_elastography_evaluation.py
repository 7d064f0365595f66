"""Clinical metrics of virtual elastograms: each against a hand-made case, and the report end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medgen_common.elastography import index_to_rgb
from medgen_common.elastography_evaluation import (
    elastography_report,
    global_ssim,
    histogram_correlation,
    mape,
    roc_auc,
    tsukuba_score,
    weighted_kappa,
)


def test_global_ssim_is_one_for_identical_images_and_matches_the_formula():
    rng = np.random.default_rng(0)
    image = rng.random((3, 16, 16))
    assert global_ssim(image, image) == pytest.approx(1.0)
    assert global_ssim(image, np.clip(image + rng.normal(0, 0.2, image.shape), 0, 1)) < 0.9
    a, b = np.array([0.0, 1.0]), np.array([0.0, 0.5])  # means 0.5, 0.25; variances 0.25, 0.0625; covariance 0.125
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * 0.5 * 0.25 + c1) * (2 * 0.125 + c2) / ((0.25 + 0.0625 + c1) * (0.25 + 0.0625 + c2))
    assert global_ssim(a, b) == pytest.approx(expected)


def test_mape_is_a_fraction():
    assert mape([2.0, 4.0], [1.0, 5.0]) == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="> 0"):
        mape([0.0, 1.0], [1.0, 1.0])


def test_histogram_correlation_drops_when_hues_change():
    index = np.tile(np.arange(64), (8, 1))
    rgb = index_to_rgb(index)
    assert histogram_correlation(rgb, rgb) == pytest.approx(1.0)
    all_blue = index_to_rgb(np.full_like(index, 5))
    assert histogram_correlation(rgb, all_blue) < 0.6


def test_roc_auc_counts_ties_half_and_needs_both_classes():
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])


@pytest.mark.parametrize(
    "hard_inside, ring_hard, score", [(0.0, False, 1), (0.3, False, 2), (0.6, False, 3), (1.0, False, 4), (1.0, True, 5)]
)
def test_tsukuba_score_follows_the_hard_fraction_rules(hard_inside, ring_hard, score):
    index = np.full((32, 32), 50)  # soft background
    mask = np.zeros((32, 32), bool)
    mask[10:20, 10:20] = True
    lesion = np.flatnonzero(mask.ravel())
    index.ravel()[lesion[: int(round(hard_inside * lesion.size))]] = 5  # blue = hard
    if ring_hard:
        index[6:24, 6:24][~mask[6:24, 6:24]] = 5
    assert tsukuba_score(index, mask) == score


def test_weighted_kappa_on_a_hand_example():
    assert weighted_kappa([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == 1.0
    # 2 categories: observed [[1, 1], [0, 2]], expected outer([2, 2], [1, 3]) / 4 = [[0.5, 1.5], [0.5, 1.5]];
    # disagreement observed 1, expected 2
    assert weighted_kappa([1, 1, 2, 2], [1, 2, 2, 2], num_categories=2) == pytest.approx(1 - 1 / 2)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    a, b = [1, 2, 3, 3, 5, 4, 2, 1], [1, 3, 3, 2, 5, 5, 1, 1]
    assert weighted_kappa(a, b) == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b, weights="quadratic"))


def _case(name: str, lesion_index: int, malignant: int) -> dict:
    index = np.full((32, 32), 40)
    mask = np.zeros((32, 32), bool)
    mask[12:20, 12:20] = True
    index[mask] = lesion_index
    return {"case": name, "real": index_to_rgb(index), "virtual": index_to_rgb(index), "mask": mask, "malignant": malignant}


def test_report_writes_one_row_per_case_and_a_perfect_summary_for_perfect_elastograms(tmp_path):
    cases = [_case(f"c{i}", lesion, int(lesion < 20)) for i, lesion in enumerate([3, 8, 12, 30, 45, 55])]
    summary = elastography_report(cases, tmp_path)
    assert summary["sr_auc_virtual"] == summary["sr_auc_real"] == 1.0
    assert summary["sr_spearman"] == pytest.approx(1.0) and summary["sign_accuracy"] == 1.0
    assert summary["lesion_index_mae"] == 0.0 and summary["sr_mape"] == 0.0 and summary["ssim"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    with open(tmp_path / "per_case.csv") as file:
        assert [row["case"] for row in csv.DictReader(file)] == [case["case"] for case in cases]
    cases[2]["virtual"] = index_to_rgb(np.full((32, 32), 40))  # the lesion disappears from one virtual map
    worse = elastography_report(cases, tmp_path / "worse")
    assert worse["lesion_index_mae"] > 0 and worse["sign_accuracy"] < 1.0


def test_report_names_a_case_without_lesion(tmp_path):
    cases = [_case("good", 5, 1), _case("empty", 50, 0)]
    cases[1]["mask"] = np.zeros((32, 32), bool)
    with pytest.raises(ValueError, match="case 'empty'.*empty"):
        elastography_report(cases, tmp_path)
