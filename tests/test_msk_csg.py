"""msk_csg bundle: configs agree with each other and with the paper's settings; training batches carry both
conditions in the order the sampler uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "msk_csg"


def _parser(*names: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in names])
    parser["bundle_root"] = str(BUNDLE)
    parser["device_name"] = "cpu"
    return parser


@pytest.mark.parametrize("demo", [True, False], ids=["demo", "full"])
def test_training_and_inference_define_the_same_networks(demo):
    extra = ["demo.json"] if demo else []
    trainings = {
        "autoencoder_def": _parser("train_autoencoder.json", "train_diffusion.json", *extra),
        "network_def": _parser("train_autoencoder.json", "train_diffusion.json", *extra),
        "mask_generator_def": _parser("train_autoencoder.json", "train_masks.json", *extra),
    }
    inference = _parser("inference.json", *extra)
    for network_id, training in trainings.items():
        if not demo and network_id == "mask_generator_def":
            trained, used = training.get(network_id), inference.get(network_id)
            assert {k: training.get_parsed_content(k) for k in ("mask_latent_dim", "mask_w_dim", "mask_channel_base")} == {
                k: inference.get_parsed_content(k) for k in ("mask_latent_dim", "mask_w_dim", "mask_channel_base")
            }
            continue
        trained, used = training.get_parsed_content(network_id), inference.get_parsed_content(network_id)
        assert [p.shape for p in trained.parameters()] == [p.shape for p in used.parameters()], network_id


def test_paper_settings_in_the_full_configs():
    training = _parser("train_autoencoder.json", "train_diffusion.json")
    inference = _parser("inference.json")
    assert [training.get_parsed_content(k) for k in ("p_context_only_dropped", "p_semantic_only_dropped", "p_both_dropped")] == [0.05] * 3
    assert training.get_parsed_content("learning_rate") == 3e-4 and training.get_parsed_content("batch_size") == 16
    assert training.get_parsed_content("gradient_accumulation") == 4
    assert isinstance(training.get_parsed_content("optimizer"), torch.optim.AdamW)
    assert (inference.get_parsed_content("semantic_scale"), inference.get_parsed_content("context_scale")) == (1.5, 2.5)
    train_betas = training.get_parsed_content("noise_scheduler").betas
    torch.testing.assert_close(inference.get_parsed_content("noise_scheduler").betas, train_betas)
    assert inference.get_parsed_content("noise_scheduler").clip_sample is False
    # input = noisy latent + one channel per class + context latent
    assert inference.get_parsed_content("diffusion_in_channels") == 4 + 8 + 4


def test_training_batch_holds_mask_and_context_in_sampler_order(tmp_path):
    from monai.data import DataLoader, Dataset

    from medgen_common.context_selection import RandomFeatureGramDescriptor, make_context_datalist
    from medgen_common.demo_data import GENERATORS

    GENERATORS["msk_ultrasound"](tmp_path, n_subjects=4, seed=0, frames_per_subject=2)
    parser = _parser("train_autoencoder.json", "train_diffusion.json", "demo.json")
    parser["dataset_dir"] = str(tmp_path / "demo")
    parser["ckpt_dir"] = str(tmp_path / "models")
    make_context_datalist(parser.get_parsed_content("datalist"), parser.get_parsed_content("context_datalist"),
                          RandomFeatureGramDescriptor(), splits=["training"], exclude_same_group=True)  # fmt: skip
    entries = parser.get_parsed_content("train#datalist")
    assert all(e["context_subject"] != e["subject"] for e in entries)  # contexts come from another clip
    batch = next(iter(DataLoader(Dataset(entries, parser.get_parsed_content("train#preprocessing")), batch_size=2)))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["context"].shape == (2, 1, 64, 64)
    assert batch["label"].shape == (2, 8, 64, 64) and torch.allclose(batch["label"].sum(1), torch.ones(2, 64, 64))
    for key in ("p_context_only_dropped", "p_semantic_only_dropped", "p_both_dropped"):
        parser[key] = 0.0
    parser["scale_factor"] = 1.0
    latents, _, _, kwargs = parser.get_parsed_content("train#prepare_batch")(batch, device="cpu")
    condition = kwargs["condition"]
    assert condition.shape == (2, 8 + 4, 16, 16) and kwargs["mode"] == "concat"
    torch.testing.assert_close(condition[:, :8].sum(1), torch.ones(2, 16, 16))  # class fractions first, as sampled
