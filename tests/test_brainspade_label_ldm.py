"""brainspade_label_ldm: the pitfalls of the brainSPADE spec (§8) pinned down on the bundle's own configs."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from medgen_common.sampling import LatentDiffusionSampler
from tools import bundles as harness

BUNDLE = harness.BUNDLES_DIR / "brainspade_label_ldm"


def _parser(*names: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in names])
    parser["bundle_root"] = str(BUNDLE)
    parser["device_name"] = "cpu"
    return parser


@pytest.mark.parametrize(
    "configs", [("train_autoencoder.json", "train_diffusion.json"), ("inference.json",)], ids=["training", "inference"]
)
def test_noise_schedule_is_the_papers_and_never_clips_latents(configs):
    scheduler = _parser(*configs).get_parsed_content("noise_scheduler")
    assert scheduler.num_train_timesteps == 1000
    assert scheduler.betas[0].item() == pytest.approx(0.0015) and scheduler.betas[-1].item() == pytest.approx(0.0195)
    # scaled_linear: sqrt-linear betas, so the middle beta is ((sqrt(b0) + sqrt(b1)) / 2)^2, not the mean
    middle = ((0.0015**0.5 + 0.0195**0.5) / 2) ** 2
    assert scheduler.betas[499:501].mean().item() == pytest.approx(middle, rel=1e-3)
    assert scheduler.clip_sample is False
    assert scheduler.prediction_type == "epsilon"


def test_network_definitions_do_not_mutate_config_lists():
    parser = _parser("inference.json", "demo.json")
    before = {key: list(parser.get_parsed_content(key)) for key in ("autoencoder_channels", "diffusion_channels")}
    parser.get_parsed_content("autoencoder_def")
    parser.get_parsed_content("network_def")
    after = {key: list(parser.get_parsed_content(key)) for key in before}
    assert before == after


def test_training_and_inference_define_the_same_networks():
    """The network definitions are written in train_autoencoder/train_diffusion and in inference: they must agree."""
    training = _parser("train_autoencoder.json", "train_diffusion.json", "demo.json")
    inference = _parser("inference.json", "demo.json")
    for network_id in ("autoencoder_def", "network_def"):
        trained = training.get_parsed_content(network_id)
        used = inference.get_parsed_content(network_id)
        assert trained.state_dict().keys() == used.state_dict().keys()
        assert [p.shape for p in trained.parameters()] == [p.shape for p in used.parameters()]


def test_focal_loss_is_categorical_and_up_weights_wmh():
    parser = _parser("train_autoencoder.json")
    loss = parser.get_parsed_content("reconstruction_loss")
    names = parser.get_parsed_content("channel_names")
    weights = dict(zip(names, loss.class_weight.flatten().tolist()))
    assert weights["wmh"] == 100.0 and all(w == 1.0 for name, w in weights.items() if name != "wmh")
    # softmax focal loss: the decoder is trained on the same categorical view in which samples are decoded
    assert loss.gamma == 3.0 and loss.use_softmax is True


def test_lesion_condition_is_a_single_four_dimensional_token(tmp_path):
    from monai.data import DataLoader, Dataset

    from medgen_common.demo_data import GENERATORS

    GENERATORS["brain"](tmp_path, n_subjects=3, seed=1, slices_per_subject=4)
    parser = _parser("train_autoencoder.json", "train_diffusion.json", "demo.json")
    parser["dataset_dir"] = str(tmp_path / "demo")
    parser["ckpt_dir"] = str(tmp_path / "models")
    batch = next(iter(DataLoader(Dataset(parser.get_parsed_content("train#datalist"), parser.get_parsed_content("train#preprocessing")), batch_size=3)))
    condition = batch["lesion_size_condition"]
    assert condition.shape == (3, 1, 4)  # [B, 1, 4]: one cross-attention token of [wmh, tumour, oedema, enhancing]
    assert condition.min() >= 0 and condition.max() <= 1
    assert batch["label"].shape == (3, 8, 56, 72)
    torch.testing.assert_close(batch["label"].sum(1), torch.ones(3, 56, 72))


def test_1mm_latent_is_padded_for_the_unet_and_cropped_back():
    values = harness.parse_config_values(
        BUNDLE, [str(BUNDLE / "configs" / n) for n in ("inference.json", "3d_2mm.json", "3d_1mm.json")],
        ["autoencoder_latent_shape", "ldm_latent_shape"],
    )  # fmt: skip
    # chapter 1, footnote: 160x176x112 -> latent 20x22x14, zero-padded to 24x24x16 for the diffusion model
    assert values == {"autoencoder_latent_shape": [20, 22, 14], "ldm_latent_shape": [24, 24, 16]}


def test_full_scale_3d_2mm_sampling_runs_one_ddim_step_on_cpu():
    torch.manual_seed(0)
    parser = _parser("inference.json", "3d_2mm.json")
    parser["scheduler_name"] = "ddim"
    autoencoder = parser.get_parsed_content("autoencoder_def").eval()
    diffusion = parser.get_parsed_content("network_def").eval()
    latent_shape = parser.get_parsed_content("ldm_latent_shape")
    assert latent_shape == [24, 32, 24]
    sampler = LatentDiffusionSampler(
        autoencoder, parser.get_parsed_content("noise_scheduler"), num_inference_steps=1, spacing=[2.0, 2.0, 2.0],
        ldm_latent_shape=latent_shape, autoencoder_latent_shape=parser.get_parsed_content("autoencoder_latent_shape"),
        verbose=False,
    )  # fmt: skip
    condition = torch.tensor([[[0.0, 0.6, 0.0, 0.0]]])
    output = sampler(torch.randn(1, 8, *latent_shape), diffusion, conditioning=condition, seeds=[0])
    assert output.shape == (1, 10, 96, 128, 96)
    torch.testing.assert_close(output.sum(1), torch.ones(1, 96, 128, 96))  # softmax over channels
