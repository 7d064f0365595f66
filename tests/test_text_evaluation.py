"""The text-generator checks with stand-in generators whose behaviour is known: an oracle passes, a generator that
ignores its condition fails."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from medgen_common.demo_data.prostate import SEQUENCES, simulate_case
from medgen_common.classification_utility import train_classifier
from medgen_common.text_evaluation import classifier_accuracy, control_accuracy, export_reader_studies, pairing_check


@pytest.fixture(scope="module")
def phantom():
    cases = [simulate_case(0, i, 32) for i in range(240)]
    images = {s: torch.stack([torch.as_tensor(c.images[s])[None] for c in cases]) for s in SEQUENCES}
    labels = torch.as_tensor([int(c.lesion_present) for c in cases])
    return cases, images, labels


@pytest.fixture(scope="module")
def classifiers(phantom):
    _, images, labels = phantom
    pooled = torch.cat([images[s][:200] for s in SEQUENCES])
    lesion = train_classifier(pooled, labels[:200].repeat(3), 2, steps=150, seed=0)
    sequence = train_classifier(pooled, torch.arange(3).repeat_interleave(200), 3, steps=150, seed=0)
    return lesion, sequence


def test_reference_classifiers_learn_the_phantom(phantom, classifiers):
    _, images, labels = phantom
    lesion, sequence = classifiers
    held_out = torch.cat([images[s][200:] for s in SEQUENCES])
    assert classifier_accuracy(lesion, images["dwi"][200:], labels[200:]) > 0.9
    assert classifier_accuracy(sequence, held_out, torch.arange(3).repeat_interleave(40)) > 0.95


def test_control_accuracy_scores_an_oracle_high_and_a_blind_generator_at_chance(phantom, classifiers):
    cases, images, labels = phantom

    def oracle(specs):  # a real held-out slice of the prompted sequence and label
        pool = {flag: [i for i in range(200, 240) if labels[i] == flag] for flag in (0, 1)}
        return torch.stack([images[s["sequence"]][pool[int(s["lesion"])][k % len(pool[int(s["lesion"])])]]
                            for k, s in enumerate(specs)])  # fmt: skip

    def blind(specs):  # always the same T2W slice
        return images["t2w"][200:201].expand(len(specs), -1, -1, -1)

    good = control_accuracy(oracle, *classifiers, SEQUENCES, samples_per_prompt=8)
    bad = control_accuracy(blind, *classifiers, SEQUENCES, samples_per_prompt=8)
    assert good["lesion_accuracy"] > 0.85 and good["sequence_accuracy"] > 0.95 and len(good["cells"]) == 6
    assert bad["lesion_accuracy"] == 0.5 and bad["sequence_accuracy"] == pytest.approx(1 / 3)


def test_pairing_check_separates_a_generator_that_follows_the_pair(phantom, classifiers):
    cases, images, labels = phantom
    index = list(range(200, 240))
    t2w, dwi = images["t2w"][index], images["dwi"][index]
    centres = [cases[i].lesion_centre for i in index]
    by_t2w = {float(t2w[k].sum()): dwi[k] for k in range(len(index))}

    def follows_pair(specs, paired):  # returns the true DW of the given T2W, a generic DW without one
        if paired is None:
            return dwi[:1].expand(len(specs), -1, -1, -1)
        return torch.stack([by_t2w[float(p.sum())] for p in paired])

    report = pairing_check(follows_pair, t2w, dwi, labels[index].tolist(), centres, classifiers[0])
    assert report["paired"]["correlation"] == pytest.approx(1.0)
    assert report["paired"]["localisation_hit_rate"] > 0.9 and report["paired_beats_controls"]
    ignores_pair = pairing_check(lambda specs, paired: dwi[:1].expand(len(specs), -1, -1, -1), t2w, dwi,
                                 labels[index].tolist(), centres, classifiers[0])  # fmt: skip
    assert not ignores_pair["paired_beats_controls"]


def test_reader_study_is_balanced_shuffled_and_keyed_separately(tmp_path):
    labels = torch.as_tensor([0, 1] * 6)
    real = {"t2w": (torch.rand(12, 1, 8, 8), labels), "t2w_dwi": (torch.rand(12, 2, 8, 8), labels)}
    synthetic = {"t2w": (torch.rand(12, 1, 8, 8), labels), "t2w_dwi": (torch.rand(12, 2, 8, 8), labels)}
    report = export_reader_studies(real, synthetic, per_cell=3, output_dir=tmp_path)
    assert {s: (r["num_real"], r["num_synthetic"]) for s, r in report.items()} == {"t2w": (6, 6), "t2w_dwi": (6, 6)}
    for sequence in ("t2w", "t2w_dwi"):
        rows = list(csv.DictReader(open(tmp_path / report[sequence]["answer_key"])))
        cells = [(r["truth"], r["lesion"]) for r in rows]
        assert sorted(set(cells)) == [("real", "0"), ("real", "1"), ("synthetic", "0"), ("synthetic", "1")]
        assert all(cells.count(cell) == 3 for cell in set(cells)) and {r["sequence"] for r in rows} == {sequence}
        assert [r["truth"] for r in rows] != ["real"] * 6 + ["synthetic"] * 6
        images = sorted((tmp_path / sequence / "blinded" / "images").iterdir())
        assert [p.name for p in images] == [f"image_{i:03d}.png" for i in range(12)]
        assert not list((tmp_path / sequence / "blinded").glob("*key*"))
    # a pair is shown side by side, magnified 4 times
    assert np.asarray(Image.open(tmp_path / "t2w_dwi" / "blinded" / "images" / "image_000.png")).shape == (32, 64)
    with pytest.raises(ValueError, match="synthetic t2w has 2 images with lesion=0, 3 needed"):
        export_reader_studies(real, {"t2w": (torch.rand(4, 1, 8, 8), torch.as_tensor([0, 1, 0, 1]))}, 3, tmp_path / "x")
