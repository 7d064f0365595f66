"""tools.utility: the one command per downstream task, on datalists written to disk as a user would have them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medgen_common.writers import save_nifti, write_json
from tools import utility

FAST = ["--steps", "20", "--batch-size", "8", "--channels", "4", "8", "--threads", "1"]


def _band(rng, folder, name: str, subject: str, frame: int, label_file=None) -> dict:
    """A 16 x 16 frame: a bright band (1) over a dark band (2) in grey; its label file is shared with its
    synthetic counterparts (they are generated from it)."""
    top = int(rng.integers(2, 8))
    label = np.zeros((16, 16), dtype=np.uint8)
    label[top : top + 3], label[top + 3 : top + 7] = 1, 2
    if label_file is not None:
        label = np.asarray(np.load(label_file.with_suffix(".npy")))
    image = (np.array([0.45, 0.9, 0.1])[label] + rng.normal(scale=0.05, size=label.shape)).astype(np.float32)
    image_file = save_nifti(image[:, :, None], folder / f"{name}_image.nii.gz", channel_first=False)
    if label_file is None:
        label_file = save_nifti(label[:, :, None], folder / f"{name}_label.nii.gz", channel_first=False)
        np.save(label_file.with_suffix(".npy"), label)
    return {"image": image_file.name, "label": label_file.name, "subject": subject, "frame": frame}


@pytest.fixture(scope="module")
def segmentation_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmentation")
    rng = np.random.default_rng(0)
    training = [_band(rng, folder, f"train{i}", f"s{i // 4}", i % 4) for i in range(16)]
    test = [_band(rng, folder, f"test{i}", f"t{i // 2}", i % 2) for i in range(6)]
    synthetic = [
        {**_band(rng, folder, f"syn{i}", "synthetic", 0, folder / item["label"]), "seed": i}
        for i, item in enumerate(training)
    ]
    write_json({"training": training, "test": test}, folder / "datalist.json")
    write_json({"training": synthetic}, folder / "datalist_synthetic.json")
    return folder


def test_segmentation_trains_every_arm_and_reports_dice_hd95_assd_with_intervals(segmentation_data, tmp_path):
    folder = segmentation_data
    args = ["segmentation", "--real", f"{folder / 'datalist.json'}:training", "--test", f"{folder / 'datalist.json'}:test",
            "--synthetic", str(folder / "datalist_synthetic.json"), "--classes", "0", "1", "2", "--merge-into", "0",
            "--class-names", "background", "bright", "dark", "--per-image", "--slice-key", "frame",
            "--concat", "1", "--replace", "0.5", "--patch-mix", "0.5:4", "--out", str(tmp_path), *FAST]  # fmt: skip
    results = utility.main(args)
    arms = ["real", "synthetic", "real+synthetic (concat 1)", "real/synthetic (replace 0.5)", "patch mix (α 0.5, p 4)"]
    assert list(results["mean_dice"]) == arms
    assert results["num_items"] == dict(zip(arms, [16, 16, 32, 16, 16]))
    assert set(results["per_subject"]["real"]) == {"t0", "t1", "t2"}
    saved = json.loads((tmp_path / "utility.json").read_text())
    assert saved["command"].startswith("python -m tools.utility segmentation") and saved["seconds"] > 0
    for arm in arms:
        for metric in ("dice", "hd95", "assd"):
            ci = saved["confidence_intervals"][arm][metric]["bright"]
            assert ci["low"] <= ci["mean"] <= ci["high"] and ci["n"] == 3
    report = (tmp_path / "utility.md").read_text()
    assert "| patch mix (α 0.5, p 4) | 16 |" in report and "ΔDice vs real" in report and "HD95" in report


def test_patch_mixing_refuses_real_items_without_a_synthetic_counterpart(segmentation_data, tmp_path):
    folder = segmentation_data
    synthetic = json.loads((folder / "datalist_synthetic.json").read_text())
    write_json({"training": synthetic["training"][:-1]}, folder / "datalist_short.json")
    args = ["segmentation", "--real", str(folder / "datalist.json"), "--test", f"{folder / 'datalist.json'}:test",
            "--synthetic", str(folder / "datalist_short.json"), "--classes", "0", "1", "2", "--merge-into", "0",
            "--patch-mix", "0.5:4", "--out", str(tmp_path), *FAST]  # fmt: skip
    with pytest.raises(ValueError, match=r"1 of 16 have none with the same 'label' \(first: .*train15_label"):
        utility.main(args)


def _lesion_items(rng, folder, prefix: str, count: int, per_patient: int) -> list[dict]:
    items = []
    for i in range(count):
        lesion = i % 2
        image = rng.normal(0.3, 0.05, (16, 16)).astype(np.float32)
        if lesion:
            x, y = rng.integers(2, 10, 2)
            image[x : x + 5, y : y + 5] += 0.5
        path = save_nifti(image[:, :, None], folder / f"{prefix}{i}_t2w.nii.gz", channel_first=False)
        items.append({"t2w": path.name, "lesion_present": lesion, "case": f"{prefix}-case{i // per_patient}"})
    return items


def test_classification_trains_class_matched_arms_and_reports_delta_auroc(tmp_path):
    rng = np.random.default_rng(1)
    real = _lesion_items(rng, tmp_path, "real", 40, 1)
    test = _lesion_items(rng, tmp_path, "test", 24, 4)
    synthetic = _lesion_items(rng, tmp_path, "syn", 30, 1) + [
        {**item, "lesion_present": 1} for item in _lesion_items(rng, tmp_path, "extra", 20, 1) if item["lesion_present"]
    ]  # 25 with a lesion, 15 without: the class-matched draws restore the real set's balance
    write_json({"training": real, "test": test}, tmp_path / "datalist.json")
    write_json({"training": synthetic}, tmp_path / "synthetic.json")
    args = ["classification", "--real", str(tmp_path / "datalist.json"), "--test", f"{tmp_path / 'datalist.json'}:test",
            "--synthetic", str(tmp_path / "synthetic.json"), "--image-key", "t2w", "--label-key", "lesion_present",
            "--group-key", "case", "--concat", "0.5", "--replace", "0.25", "--out", str(tmp_path / "out"), *FAST]  # fmt: skip
    results = utility.main(args)
    assert results["class_counts"] == {
        "real": {0: 20, 1: 20},
        "synthetic": {0: 15, 1: 25},  # too few synthetic items without a lesion to match 20/20: all, as generated
        "real+synthetic (concat 0.5)": {0: 30, 1: 30},
        "real/synthetic (replace 0.25)": {0: 20, 1: 20},
    }
    assert results["test"] == {"items": 24, "patients": 6, "class_counts": {0: 12, 1: 12}}
    assert set(results["delta_auroc"]) == {"synthetic", "real+synthetic (concat 0.5)", "real/synthetic (replace 0.25)"}
    assert "ΔAUROC vs real" in (tmp_path / "out" / "utility.md").read_text()
    write_json({"training": [{"t2w": real[0]["t2w"]}]}, tmp_path / "unlabelled.json")
    with pytest.raises(ValueError, match="1 entries of .*unlabelled.json have no 'lesion_present'"):
        utility.main([*args[:5], "--synthetic", str(tmp_path / "unlabelled.json"), *args[7:]])


def test_cross_validation_tests_every_patient_once_against_traditional_augmentations(segmentation_data, tmp_path):
    folder = segmentation_data
    args = ["segmentation", "--real", f"{folder / 'datalist.json'}:training", "--folds", "2",
            "--synthetic", str(folder / "datalist_synthetic.json"), "--classes", "0", "1", "2", "--merge-into", "0",
            "--class-names", "background", "bright", "dark", "--per-image", "--slice-key", "frame",
            "--augment", "mirror", "gamma", "--patch-mix", "0.5:4", "--architecture", "attention_unet",
            "--out", str(tmp_path), *FAST]  # fmt: skip
    results = utility.main(args)
    arms = ["real", "synthetic", "real, mirror augmentation", "real, gamma augmentation", "patch mix (α 0.5, p 4)"]
    assert list(results["mean_dice"]) == arms
    # 4 patients of 4 frames in 2 folds of 2 patients; each fold's synthetic items come from its training frames
    assert results["num_items"] == {arm: [8, 8] for arm in arms}
    assert set(results["per_subject"]["real"]) == {"s0", "s1", "s2", "s3"}
    tested = [set(fold["per_subject"]["real"]) for fold in results["folds"]]
    assert len(tested) == 2 and not tested[0] & tested[1]
    saved = json.loads((tmp_path / "utility.json").read_text())
    for arm in arms:
        assert set(saved["confidence_intervals"][arm]) == {"dice", "precision", "recall", "hd95", "assd"}
        assert saved["confidence_intervals"][arm]["dice"]["bright"]["n"] == 4
    report = (tmp_path / "utility.md").read_text()
    assert "2-fold cross-validation" in report and "| real, mirror augmentation | 8 / 8 |" in report
    with pytest.raises(SystemExit):  # --folds tests on the held-out folds, not on a test split
        utility.main([*args, "--test", f"{folder / 'datalist.json'}:test"])


def test_cross_validation_refuses_entries_without_a_patient_key(segmentation_data, tmp_path):
    folder = segmentation_data
    args = ["segmentation", "--real", f"{folder / 'datalist.json'}:training", "--folds", "2", "--group-key", "case",
            "--synthetic", str(folder / "datalist_synthetic.json"), "--classes", "0", "1", "2", "--merge-into", "0",
            "--out", str(tmp_path), *FAST]  # fmt: skip
    with pytest.raises(ValueError, match="--folds splits by 'case', which 16 entries of .* lack \\(first: entry 0\\)"):
        utility.main(args)
