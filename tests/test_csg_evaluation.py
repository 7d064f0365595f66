"""Evaluation of the msk_csg bundle (csg spec §5): similarity metrics, segmentation scores, context following, the
visual Turing test kit and the whole report on a tiny untrained model."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from PIL import Image

from medgen_common.csg_evaluation import (
    DEFAULT_GUIDANCE_SETTINGS,
    RANDOM_FEATURE_FID_NAME,
    context_following,
    csg_report,
    feature_fid,
    intensity_similarity,
    mask_following,
    segmentation_scores,
)
from medgen_common.datalist import load_datalist
from medgen_common.demo_data.ultrasound import (
    CLASS_NAMES,
    DEVICES,
    make_msk_dataset,
    simulate_bmode,
    smooth_random_field,
)
from medgen_common.reader_study import export_reader_study, score_reader_study
from medgen_common.sampling import make_scheduler
from medgen_common.writers import image_to_uint8, save_nifti


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --- similarity ------------------------------------------------------------------------------------------------------


def test_intensity_similarity_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = _rand(6, 1, 32, 32)
    same = intensity_similarity(real, real.clone())
    assert same["ks_statistic"] == 0.0 and same["ks_pvalue"] == pytest.approx(1.0)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-12)

    other_draw = intensity_similarity(real, _rand(6, 1, 32, 32, seed=1))
    small = intensity_similarity(real, (real * 0.9 + 0.1))
    large = intensity_similarity(real, (real * 0.6 + 0.4))
    assert 0 < other_draw["ks_statistic"] < small["ks_statistic"] < large["ks_statistic"]
    assert 0 < other_draw["kl_divergence"] < small["kl_divergence"] < large["kl_divergence"]
    # sequences of per-image arrays pool like a batch
    assert intensity_similarity(list(real.numpy()), list(real * 0.6 + 0.4)) == large


def test_kl_divergence_is_real_relative_to_synthetic():
    uniform = (torch.arange(64 * 64) + 0.5) / (64 * 64)  # equal counts in every bin
    lower_half = uniform / 2  # equal counts in the lower 16 of 32 bins
    # KL(lower half || uniform) = log 2; the other way round the real upper half has only epsilon synthetic mass
    assert intensity_similarity(lower_half, uniform, bins=32)["kl_divergence"] == pytest.approx(math.log(2), abs=1e-3)
    assert (
        intensity_similarity(uniform, lower_half, bins=32)["kl_divergence"] > 4
    )  # -0.5 log 2 + 0.5 log((1/32) / 1e-6) = 4.8


def test_feature_fid_is_zero_for_a_set_with_itself_and_larger_for_a_different_set():
    real = _rand(16, 1, 32, 32)
    assert abs(feature_fid(real, real.clone())) < 1e-6
    another_draw = feature_fid(real, _rand(16, 1, 32, 32, seed=1))
    darker = feature_fid(real, real * 0.5)
    assert 0 < another_draw < darker
    assert RANDOM_FEATURE_FID_NAME == "FID (random-feature extractor)"


# --- segmentation scores ---------------------------------------------------------------------------------------------


def test_segmentation_scores_count_overlap_per_class():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, :2, :2] = 1  # 4 pixels of class 1
    pred[0, :2, :3] = 1  # 6 predicted, 4 of them right
    pred[0, 0, 0] = 0  # ... now 5 predicted, 3 right: TP 3, FP 2, FN 1
    target[1, 3, 3] = 1  # the second image adds one missed pixel: TP 3, FP 2, FN 2
    pred[1, 0, 0] = 3  # class 3: predicted once, never present
    scores = segmentation_scores(pred, target, num_classes=4, class_names=["bg", "a", "b", "c"])

    a = scores["per_class"]["a"]
    assert a["dsc"] == pytest.approx(6 / 10) and a["iou"] == pytest.approx(3 / 7)
    assert a["ppv"] == pytest.approx(3 / 5) and a["tpr"] == pytest.approx(3 / 5)
    assert a["target_pixels"] == 5 and a["predicted_pixels"] == 5
    assert all(math.isnan(value) for key, value in scores["per_class"]["b"].items() if key[-6:] != "pixels")
    c = scores["per_class"]["c"]
    assert c["dsc"] == c["iou"] == c["ppv"] == 0.0 and math.isnan(c["tpr"])
    assert "bg" not in scores["per_class"]
    assert scores["mean"] == {key: a[key] for key in ("dsc", "iou", "ppv", "tpr")}  # only "a" is in the target
    with_background = segmentation_scores(pred, target, num_classes=4, include_background=True)
    assert with_background["per_class"]["class_0"]["target_pixels"] == 32 - 5
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        segmentation_scores(pred, target, num_classes=3)


def test_iou_follows_from_ppv_and_tpr_by_the_hull_identity():
    # the paper's Table 3: IoU = 1 / (1/PPV + 1/TPR - 1) reproduces CSG's 0.316 and the baseline's 0.270
    assert round(1 / (1 / 0.376 + 1 / 0.665 - 1), 3) == 0.316
    assert round(1 / (1 / 0.437 + 1 / 0.414 - 1), 3) == 0.270
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 16, 16), generator=generator)
    wrong = torch.randint(0, 5, (3, 16, 16), generator=generator)
    pred = torch.where(torch.rand(3, 16, 16, generator=generator) < 0.6, target, wrong)
    for name, s in segmentation_scores(pred, target, num_classes=5)["per_class"].items():
        assert s["iou"] == pytest.approx(1 / (1 / s["ppv"] + 1 / s["tpr"] - 1)), name
        assert s["dsc"] == pytest.approx(2 * s["ppv"] * s["tpr"] / (s["ppv"] + s["tpr"])), name


class Threshold(torch.nn.Module):
    """A segmenter of class 1 wherever the (unnormalised) image exceeds 0.5."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return torch.cat([0.5 - images, images - 0.5], dim=1)


def test_mask_following_scores_the_segmentation_of_generated_images_against_their_masks():
    masks = torch.zeros(3, 16, 16, dtype=torch.long)
    masks[:, 4:10, 2:8] = 1
    images = 0.2 + 0.6 * masks[:, None].float()
    followed = mask_following(Threshold(), images, masks, num_classes=2, normalisation="none")
    assert followed["per_class"]["class_1"]["dsc"] == 1.0
    shifted = mask_following(Threshold(), images, masks.roll(3, dims=-1), num_classes=2, normalisation="none")
    assert shifted["per_class"]["class_1"]["dsc"] == pytest.approx(0.5)  # 3 of 6 columns overlap
    with pytest.raises(ValueError, match="do not match"):
        mask_following(Threshold(), images, masks[:, :8], num_classes=2)


# --- context following -----------------------------------------------------------------------------------------------


def _device_textures(per_device: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Speckle of each demo device over smooth random tissue: ``[4 * per_device, 1, 64, 64]`` and the devices."""
    images, devices = [], []
    for index, device in enumerate(DEVICES):
        rng = np.random.default_rng([seed, index])
        for _ in range(per_device):
            level_db = -25 + 8 * smooth_random_field(rng, (128, 128), 6.0)
            images.append(simulate_bmode(10 ** (level_db / 10), np.ones((128, 128)), device, 0.2, rng, supersample=2))
            devices.append(index)
    return torch.from_numpy(np.stack(images))[:, None], devices


def test_context_following_finds_the_device_of_the_context_image():
    reference, reference_devices = _device_textures(per_device=4, seed=1)
    generated, devices = _device_textures(per_device=3, seed=2)  # "generated" with the style of their context
    other_devices = [(device + 1) % 4 for device in devices]
    result = context_following(generated, devices, reference, reference_devices, mask_devices=other_devices)
    assert result == {"context_device_match": 1.0, "mask_device_match": 0.0, "chance": 0.25, "num_devices": 4}
    swapped = context_following(generated, other_devices, reference, reference_devices)
    assert swapped["context_device_match"] == 0.0 and swapped["mask_device_match"] is None
    with pytest.raises(ValueError, match=r"context_devices must give one device per image \(12\)"):
        context_following(generated, devices[:5], reference, reference_devices)


# --- Turing test -----------------------------------------------------------------------------------------------------


def _read_rows(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _write_responses(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "response"])
        writer.writeheader()
        writer.writerows(rows)


def test_turing_export_writes_blinded_pngs_and_a_key_that_matches_them(tmp_path):
    real = [_rand(24, 24, seed=index) for index in range(3)]  # real images as NIfTI files, synthetic as arrays
    real_paths = [str(save_nifti(x, tmp_path / f"real_{i}.nii.gz", channel_first=False)) for i, x in enumerate(real)]
    synthetic = _rand(5, 1, 24, 24, seed=10) * 0.5
    exported = export_reader_study(real_paths, synthetic, tmp_path / "turing", seed=3)
    assert exported["num_real"] == 3 and exported["num_synthetic"] == 5
    pngs = sorted((tmp_path / "turing" / "blinded" / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"image_{i:03d}.png" for i in range(8)]
    assert not list((tmp_path / "turing" / "blinded").glob("*key*"))  # the key stays out of the raters' folder

    key = _read_rows(exported["answer_key"])
    assert sorted(row["image"] for row in key) == [p.name for p in pngs]
    for row in key:
        source = (real if row["truth"] == "real" else synthetic)[int(row["source_index"])]
        expected = image_to_uint8(source, value_range=(0, 1))[..., 0]
        assert np.array_equal(np.asarray(Image.open(pngs[0].parent / row["image"])), expected), row
    assert [row["truth"] for row in key] != ["real"] * 3 + ["synthetic"] * 5  # shuffled
    assert _read_rows(export_reader_study(real_paths, synthetic, tmp_path / "again", seed=3)["answer_key"]) == key
    assert _read_rows(export_reader_study(real_paths, synthetic, tmp_path / "other", seed=4)["answer_key"]) != key

    blank = _read_rows(exported["responses"])
    assert [row["image"] for row in blank] == [row["image"] for row in key]
    assert all(row["response"] == "" for row in blank)


def test_turing_scores_treat_synthetic_as_the_positive_class(tmp_path):
    exported = export_reader_study(list(_rand(4, 1, 8, 8)), list(_rand(6, 1, 8, 8, seed=1)), tmp_path, seed=0)
    key = _read_rows(exported["answer_key"])
    responses = tmp_path / "rater.csv"

    _write_responses(responses, [{"image": row["image"], "response": row["truth"].upper()} for row in key])
    perfect = score_reader_study(exported["answer_key"], responses)
    assert perfect["accuracy"] == perfect["sensitivity"] == perfect["specificity"] == perfect["f1"] == 1.0
    assert (perfect["true_positive"], perfect["true_negative"], perfect["answered"]) == (6, 4, 10)

    # always "synthetic", one image left blank (a real one)
    blank_real = next(row["image"] for row in key if row["truth"] == "real")
    rows = [{"image": row["image"], "response": "" if row["image"] == blank_real else "synthetic"} for row in key]
    _write_responses(responses, rows)
    biased = score_reader_study(exported["answer_key"], responses)
    assert biased["sensitivity"] == 1.0 and biased["specificity"] == 0.0
    assert biased["accuracy"] == pytest.approx(6 / 9) and biased["ppv"] == pytest.approx(6 / 9)
    assert biased["unanswered"] == 1 and biased["false_positive"] == 3

    _write_responses(responses, [{"image": key[0]["image"], "response": "fake"}])
    with pytest.raises(ValueError, match="line 2: response 'fake' must be 'real' or 'synthetic'"):
        score_reader_study(exported["answer_key"], responses)
    _write_responses(responses, [{"image": "image_999.png", "response": "real"}])
    with pytest.raises(ValueError, match="'image_999.png' is not in the answer key"):
        score_reader_study(exported["answer_key"], responses)


# --- the whole report ------------------------------------------------------------------------------------------------

LATENT = 2


def _tiny_model():
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), latent_channels=LATENT, num_res_blocks=1,
        attention_levels=(False, False), norm_num_groups=4, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )  # fmt: skip
    network = DiffusionModelUNet(
        spatial_dims=2, in_channels=LATENT + len(CLASS_NAMES) + LATENT, out_channels=LATENT, channels=(8, 8),
        attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4,
    )  # fmt: skip
    for parameter in network.out.parameters():  # MONAI zero-initialises the output layer: give it a response
        torch.nn.init.normal_(parameter, std=0.1)
    return autoencoder, network


def test_csg_report_runs_the_protocol_end_to_end_on_a_tiny_model(tmp_path):
    """Quick by construction: 12 training and 4 test images of 64 x 64, 2 sampling steps, 3 segmenter steps."""
    datalist = make_msk_dataset(tmp_path / "data", n_subjects=8, frames_per_subject=2, val_fraction=0.0,
                                test_fraction=0.25)["demo/2d"]  # fmt: skip
    training = load_datalist(datalist, "training", ("image", "label"))
    test = load_datalist(datalist, "test", ("image", "label"))
    for index, entry in enumerate(training):
        entry["context"] = training[(index + 2) % len(training)]["image"]
    for index, entry in enumerate(test):
        entry["context"], entry["context_device"] = training[index]["image"], training[index]["device"]
    autoencoder, network = _tiny_model()

    report = csg_report(
        autoencoder, network, make_scheduler("ddim"), 1.0, test, training, tmp_path / "evaluation",
        num_inference_steps=2, segmenter_steps=3, segmenter_batch_size=4, segmenter_channels=(4, 8), num_synthetic=5,
        sample_batch_size=3,  # several sampler batches, concatenated
        progress=False,
    )  # fmt: skip

    settings = list(DEFAULT_GUIDANCE_SETTINGS)
    written = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert set(written) == set(report) == {
        "settings", "num_test_pairs", "num_training_images", "num_inference_steps", "seed", "class_names",
        "segmenter", "fid_name", "mask_following", "context_following", "similarity", "segmentation_gain",
        "turing_test", "files",
    }  # fmt: skip
    assert written["fid_name"] == "FID (random-feature extractor)"
    assert list(written["mask_following"]) == ["real_test", *settings]
    assert list(written["context_following"]) == ["real_test", *settings]
    assert list(written["similarity"]) == ["real_training", *settings]
    for setting in settings:
        assert set(written["similarity"][setting]) == {"ks_statistic", "ks_pvalue", "kl_divergence", "fid"}
        assert written["context_following"][setting]["chance"] == 0.25
        assert written["mask_following"][setting]["per_class"].keys() == set(CLASS_NAMES[1:])
    # mask following is scored against the test masks the samples were conditioned on
    masks = np.stack([nib.load(entry["label"]).get_fdata() for entry in test])
    for index, name in enumerate(CLASS_NAMES[1:], start=1):
        assert written["mask_following"]["paper"]["per_class"][name]["target_pixels"] == int((masks == index).sum())
    # the guidance setting changes the samples (same seeds): their similarity to the real images differs
    assert written["similarity"]["paper"]["fid"] != written["similarity"]["unconditional"]["fid"]

    gain = written["segmentation_gain"]
    assert {name: entry["num_items"] for name, entry in gain["training_sets"].items()} == {
        "real": 12, "real+synthetic (paper)": 17, "real+synthetic (semantic_only)": 17,
    }  # fmt: skip
    assert gain["training_sets"]["real"]["scores"] == written["mask_following"]["real_test"]
    assert gain["mean_dsc_ratio_to_real"]["real"] == 1.0

    out = tmp_path / "evaluation"
    assert written["turing_test"]["num_real"] == written["turing_test"]["num_synthetic"] == 4
    assert len(list((out / "turing_test" / "blinded" / "images").glob("*.png"))) == 8
    assert (out / written["turing_test"]["answer_key"]).is_file()
    grid = Image.open(out / written["files"]["grid_images"])
    rows = written["files"]["grid_images_rows"]
    assert rows == ["context", "real image of the mask", *settings]
    assert grid.size == (4 * 66 * 2, len(rows) * 66 * 2)  # 4 pairs of 64 x 64 tiles, 2 px gaps, upscaled x2
    assert Image.open(out / written["files"]["grid_masks"]).size == (4 * 66 * 2, 66 * 2)

    with pytest.raises(ValueError, match=r"setting\(s\) \['strong'\] are not among"):
        csg_report(autoencoder, network, make_scheduler("ddim"), 1.0, test, training, out, turing_setting="strong")
    del test[1]["context_device"]
    with pytest.raises(ValueError, match=r"test entries entry 1 misses key\(s\) \['context_device'\]"):
        csg_report(autoencoder, network, make_scheduler("ddim"), 1.0, test, training, out)
