"""Context-semantic guided latent diffusion: conditions, training batches and the guided sampler."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from medgen_common.csg import CsgPrepareBatch, CsgSampler, cross_device_pairs, semantic_condition
from medgen_common.sampling import make_scheduler

CLASSES, LATENT = 3, 2


def _autoencoder():
    torch.manual_seed(0)
    return AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), latent_channels=LATENT, num_res_blocks=1,
        attention_levels=(False, False), norm_num_groups=4, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )  # fmt: skip


def _unet():
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=LATENT + CLASSES + LATENT, out_channels=LATENT, channels=(8, 8),
        attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4,
    )  # fmt: skip
    for parameter in unet.out.parameters():  # MONAI zero-initialises the output layer: give it a response
        torch.nn.init.normal_(parameter, std=0.1)
    return unet


def _batch(size=4):
    generator = torch.Generator().manual_seed(0)
    mask = torch.randint(0, CLASSES, (size, 16, 16), generator=generator)
    label = torch.nn.functional.one_hot(mask, CLASSES).permute(0, 3, 1, 2).float()
    return {"image": torch.rand(size, 1, 16, 16, generator=generator), "context": torch.rand(size, 1, 16, 16, generator=generator), "label": label}


def test_semantic_condition_is_the_class_fraction_per_latent_cell():
    label = torch.zeros(1, 2, 4, 4)
    label[0, 0, :, :2], label[0, 1, :, 2:] = 1.0, 1.0
    label[0, :, 0, 0] = torch.tensor([0.0, 1.0])
    pooled = semantic_condition(label, (2, 2))
    assert pooled.shape == (1, 2, 2, 2)
    assert torch.allclose(pooled[0, 1], torch.tensor([[0.25, 1.0], [0.0, 1.0]]))
    assert torch.allclose(pooled.sum(1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="multiple"):
        semantic_condition(label, (3, 3))


def test_prepare_batch_concatenates_conditions_and_zeroes_dropped_ones():
    prepare = CsgPrepareBatch(1000, _autoencoder(), scale_factor=0.5, p_context_only_dropped=0.0,
                              p_semantic_only_dropped=0.0, p_both_dropped=1.0)  # fmt: skip
    torch.manual_seed(1)
    latents, target, args, kwargs = prepare(_batch(8), device="cpu")
    assert latents.shape == (8, LATENT, 8, 8) and type(latents) is torch.Tensor
    assert kwargs["mode"] == "concat" and torch.equal(target, kwargs["noise"])
    assert kwargs["condition"].shape == (8, CLASSES + LATENT, 8, 8)
    assert (kwargs["condition"] == 0).all()  # every sample dropped both conditions
    kept = CsgPrepareBatch(1000, _autoencoder(), p_context_only_dropped=0.0, p_semantic_only_dropped=0.0, p_both_dropped=0.0)
    _, _, _, kwargs = kept(_batch(8), device="cpu")
    assert torch.allclose(kwargs["condition"][:, :CLASSES].sum(1), torch.ones(8, 8, 8))
    # the trainer's inferer accepts the batch as prepared
    prediction = DiffusionInferer(make_scheduler("ddpm"))(latents, _unet(), **{k: kwargs[k] for k in ("noise", "timesteps", "condition", "mode")})
    assert prediction.shape == latents.shape


def test_sampler_is_seeded_counts_steps_and_follows_its_conditions():
    sampler = CsgSampler(_autoencoder(), make_scheduler("ddim"), num_inference_steps=3, semantic_scale=1.5, context_scale=2.5)
    batch, network = _batch(2), _unet()
    images = sampler(batch["label"], network, context=batch["context"], seeds=[0, 1])
    assert images.shape == (2, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert sampler.last_nfe == 3
    again = sampler(batch["label"], network, context=batch["context"], seeds=[0, 1])
    assert torch.equal(images, again)
    other_context = sampler(batch["label"], network, context=batch["context"].flip(-1), seeds=[0, 1])
    assert not torch.allclose(images, other_context)


def test_cross_device_pairs_take_contexts_from_other_devices_else_other_subjects():
    entries = [{"image": f"i{k}", "label": f"l{k}", "device": k % 3, "subject": k // 2} for k in range(12)]
    pairs = cross_device_pairs(entries, seed=0)
    assert [p["image"] for p in pairs] == [e["image"] for e in entries]
    assert all(p["context_device"] != p["device"] for p in pairs)
    assert all(int(p["context"][1:]) % 3 == p["context_device"] for p in pairs)
    assert pairs == cross_device_pairs(entries, seed=0)
    one_device = cross_device_pairs([{**e, "device": 0} for e in entries], seed=0)
    assert all(p["context_subject"] != p["subject"] for p in one_device)
    bare = cross_device_pairs([{"image": "a"}, {"image": "b"}])
    assert [p["context"] for p in bare] == ["b", "a"]
    with pytest.raises(ValueError, match="two entries"):
        cross_device_pairs([{"image": "a", "device": 0}])
