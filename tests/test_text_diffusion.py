"""Text- and image-conditioned latent diffusion: context shapes, guidance nulls, pairing pathways, learning, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medgen_common.guidance import CONTEXT, NULL_CONTEXT_VALUE, classifier_free_guidance
from medgen_common.text import TextEncoder, WordTokenizer
from medgen_common.text_diffusion import (
    ImageCodeAutoencoder,
    RandPromptd,
    TextConditionedUNet,
    TextDiffusionInferer,
    TextDiffusionPrepareBatch,
    TextLatentSampler,
    Tokenized,
)

TOKENIZER = WordTokenizer(max_length=14)
PROMPTS = ["A T2 image of a prostate with a lesion", "Prostate DW image without lesion"] * 2


def _model(pairing="none", seed=0, perturb=False):
    """A tiny text-conditioned U-Net; ``perturb`` adds noise to every weight, since MONAI zero-initialises the
    U-Net's output and attention projections (an untrained U-Net ignores every condition)."""
    torch.manual_seed(seed)
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=6 if pairing == "concat" else 3, out_channels=3, channels=(16, 32),
        attention_levels=(True, True), num_res_blocks=1, num_head_channels=16, norm_num_groups=8,
        with_conditioning=True, cross_attention_dim=32,
    )  # fmt: skip
    encoder = TextEncoder(TOKENIZER.vocab_size, 14, embedding_dim=32, num_layers=1, num_heads=4)
    model = TextConditionedUNet(unet, encoder, image_code_dim=128 if pairing == "crossattn" else 0, embedding_dim=32)
    if perturb:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _autoencoder():
    torch.manual_seed(1)
    return AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 16), latent_channels=3, num_res_blocks=1,
        attention_levels=(False, False, False), norm_num_groups=8, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )  # fmt: skip


def _batch(paired=(1, 1, 0, 0)):
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(4, 1, 32, 32, generator=generator),
        "paired_image": torch.rand(4, 1, 32, 32, generator=generator),
        "paired": torch.tensor(paired),
        "tokens": TOKENIZER(PROMPTS),
    }


def test_context_shape_with_and_without_the_image_token():
    tokens = TOKENIZER(PROMPTS)
    assert _model("none").encode_context(tokens).shape == (4, 14, 32)
    model = _model("crossattn")
    without = model.encode_context(tokens)
    assert without.shape == (4, 15, 32) and torch.all(without[:, -1] == 0)  # no image: the zero token
    code = torch.randn(4, 128)
    with_code = model.encode_context(tokens, code)
    assert with_code.shape == (4, 15, 32) and (with_code[:, -1].abs().sum(-1) > 0).all()
    torch.testing.assert_close(with_code[:, :-1], without[:, :-1])
    with pytest.raises(ValueError, match=r"image_code must be \[B, 128\]"):
        model.encode_context(tokens, torch.randn(4, 64))
    with pytest.raises(ValueError, match="no image token"):
        _model("none").encode_context(tokens, code)


def test_training_null_equals_the_sampling_null():
    model, tokens = _model("crossattn"), TOKENIZER(PROMPTS)
    keep = torch.tensor([True, False, True, False])
    context = model.encode_context(tokens, torch.randn(4, 128), keep_text=keep)
    assert torch.all(context[~keep] == NULL_CONTEXT_VALUE) and not torch.any(context[keep] == NULL_CONTEXT_VALUE)
    # the guidance rule's unconditional branch builds the same -1 context as training dropout
    rule = classifier_free_guidance(3.0, CONTEXT)
    _, stacked = rule.network_input(torch.zeros(4, 3, 8, 8), [model.encode_context(tokens)])
    torch.testing.assert_close(stacked[:4], context[~keep][:1].expand(4, -1, -1))


@pytest.mark.parametrize("pairing", ["crossattn", "concat"])
def test_the_pair_reaches_the_unet(pairing):
    model, autoencoder, encoder, batch = (
        _model(pairing, perturb=True),
        _autoencoder(),
        ImageCodeAutoencoder((32, 32)),
        _batch(),
    )
    prepare = TextDiffusionPrepareBatch(1000, autoencoder, 1.0, pairing, encoder, 0.0, 0.0, 0.0)
    inferer = TextDiffusionInferer(DDPMScheduler(1000, schedule="cosine", clip_sample=False))
    torch.manual_seed(0)
    latents, _, _, kwargs = prepare({**batch, "paired": torch.ones(4)})
    paired = inferer(latents, model, **kwargs)
    unpaired = inferer(
        latents,
        model,
        **{k: (torch.zeros_like(v) if k in ("paired_latent", "image_code") else v) for k, v in kwargs.items()},
    )
    assert (paired - unpaired).abs().mean() > 1e-4

    sampler = TextLatentSampler(autoencoder, DDIMScheduler(1000, schedule="cosine", clip_sample=False), 3, (3, 8, 8),
                                pairing=pairing, image_encoder=encoder, text_scale=2.0, pair_scale=2.0)  # fmt: skip
    samples = sampler(batch["tokens"], model, batch["paired_image"], seeds=[0, 1, 2, 3])
    assert samples.shape == (4, 1, 32, 32) and samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples, sampler(batch["tokens"], model, batch["paired_image"], seeds=[0, 1, 2, 3]))
    # a sample depends on its seed and conditions, not on its batch
    single = sampler(batch["tokens"][2:3], model, batch["paired_image"][2:3], seeds=[2])
    torch.testing.assert_close(single[0], samples[2], atol=1e-5, rtol=1e-4)
    assert sampler.last_nfe == 3


def test_prepare_batch_pairs_only_paired_samples_and_drops_for_guidance():
    autoencoder, batch = _autoencoder(), _batch(paired=(1, 0, 1, 0))
    prepare = TextDiffusionPrepareBatch(1000, autoencoder, 0.7, "concat", p_text_only_dropped=0.0,
                                        p_pair_only_dropped=0.0, p_both_dropped=0.0)  # fmt: skip
    latents, noise, _, kwargs = prepare(batch)
    assert latents.shape == noise.shape == kwargs["paired_latent"].shape == (4, 3, 8, 8)
    assert (
        torch.all(kwargs["paired_latent"][[1, 3]] == 0)
        and (kwargs["paired_latent"][[0, 2]].abs().sum((1, 2, 3)) > 0).all()
    )
    assert kwargs["keep_text"].all()
    # the pair latent is the deterministic posterior mean, as in sampling
    torch.testing.assert_close(kwargs["paired_latent"][0], autoencoder.encode(batch["paired_image"][:1])[0][0] * 0.7)
    everything = TextDiffusionPrepareBatch(1000, autoencoder, 0.7, "concat", p_text_only_dropped=0.0,
                                           p_pair_only_dropped=0.0, p_both_dropped=1.0)  # fmt: skip
    _, _, _, dropped = everything(batch)
    assert not dropped["keep_text"].any() and torch.all(dropped["paired_latent"] == 0)
    crossattn = TextDiffusionPrepareBatch(
        1000, autoencoder, 0.7, "crossattn", ImageCodeAutoencoder((32, 32)), 0.0, 0.0, 0.0
    )
    _, _, _, coded = crossattn(batch)
    assert coded["image_code"].shape == (4, 128) and torch.all(coded["image_code"][[1, 3]] == 0)
    with pytest.raises(ValueError, match="needs the trained image_encoder"):
        TextDiffusionPrepareBatch(1000, autoencoder, 0.7, "crossattn")
    with pytest.raises(ValueError, match="unknown pairing 'film'"):
        TextDiffusionPrepareBatch(1000, autoencoder, 0.7, "film")
    with pytest.raises(ValueError, match="dropout rates"):
        TextDiffusionPrepareBatch(1000, autoencoder, 0.7, "none", p_both_dropped=1.5)


def test_loss_goes_down_on_a_fixed_batch():
    model, autoencoder = _model("concat"), _autoencoder()
    prepare = TextDiffusionPrepareBatch(1000, autoencoder, 1.0, "concat", p_text_only_dropped=0.0,
                                        p_pair_only_dropped=0.0, p_both_dropped=0.0)  # fmt: skip
    inferer = TextDiffusionInferer(DDPMScheduler(1000, schedule="cosine", clip_sample=False))
    torch.manual_seed(0)
    latents, noise, _, kwargs = prepare(_batch())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.l1_loss(inferer(latents, model, **kwargs), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    # the text encoder learns with the U-Net
    assert model.text_encoder.token_embedding.weight.grad is not None


def test_rand_prompt_draws_sequences_prompts_and_pairs_reproducibly():
    item = {"t2w": torch.full((1, 4, 4), 1.0), "adc": torch.full((1, 4, 4), 2.0), "dwi": torch.full((1, 4, 4), 3.0),
            "lesion_present": 1}  # fmt: skip
    transform = RandPromptd(pair_probability=1.0)
    transform.set_random_state(0)
    outputs = [transform(item) for _ in range(30)]
    transform.set_random_state(0)
    assert [o["prompt"] for o in outputs] == [transform(item)["prompt"] for _ in range(30)]
    for output in outputs:
        sequence = ("t2w", "adc", "dwi")[output["sequence"]]
        assert float(output["image"].mean()) == {"t2w": 1.0, "adc": 2.0, "dwi": 3.0}[sequence]
        assert (
            "lesion" in output["prompt"] and "no lesion" not in output["prompt"] and "without" not in output["prompt"]
        )
        assert output["paired"] == int(sequence == "dwi")
        assert float(output["paired_image"].mean()) == (1.0 if sequence == "dwi" else 0.0)
    assert {o["sequence"] for o in outputs} == {0, 1, 2}
    tokens = Tokenized("prompt", TOKENIZER)(outputs[0])["tokens"]
    assert tokens.shape == (14,) and tokens.dtype == torch.long
    with pytest.raises(KeyError, match="needs 'lesion_present'"):
        transform({k: v for k, v in item.items() if k != "lesion_present"})


def test_image_code_autoencoder_shapes():
    model = ImageCodeAutoencoder((32, 32), channels=(16, 32, 32), code_dim=128)
    images = torch.rand(2, 1, 32, 32)
    assert model.encode(images).shape == (2, 128) and model(images).shape == (2, 1, 32, 32)
    assert ImageCodeAutoencoder((64, 64), channels=(8, 16, 16, 32)).encode(torch.rand(1, 1, 64, 64)).shape == (1, 128)
    with pytest.raises(ValueError, match="divisible by 8"):
        ImageCodeAutoencoder((36, 32))


def test_leading_ddim_spacing_avoids_the_cosine_schedules_singular_last_step():
    from medgen_common.sampling import make_scheduler

    linspace = make_scheduler("ddim", 1000, "cosine")
    linspace.set_timesteps(50)
    assert int(linspace.timesteps[0]) == 999 and float(linspace.alphas_cumprod[999]) < 1e-8  # x0 = (x - eps) / 5e-5
    leading = make_scheduler("ddim", 1000, "cosine", timestep_spacing="leading")
    leading.set_timesteps(50)
    assert leading.timesteps.tolist() == list(range(980, -1, -20)) and float(leading.alphas_cumprod[980]) > 5e-4
    # a model that predicts the noise with a 5 % error stays bounded with leading spacing and diverges without
    torch.manual_seed(0)
    latents = {name: torch.randn(64, 3, 4, 4) for name in ("linspace", "leading")}
    for name, scheduler in (("linspace", linspace), ("leading", leading)):
        for t in scheduler.timesteps:
            latents[name] = scheduler.step(
                0.95 * latents[name] / (1 - scheduler.alphas_cumprod[t]).sqrt().clamp_min(1), int(t), latents[name]
            )[0]
    assert latents["leading"].std() < 3 and latents["linspace"].std() > 10 * latents["leading"].std()
    with pytest.raises(ValueError, match="apply to DDIM only"):
        make_scheduler("ddpm", 1000, "cosine", timestep_spacing="leading")


def test_rand_prompt_sequence_weights():
    item = {"t2w": torch.zeros(1, 2, 2), "adc": torch.zeros(1, 2, 2), "dwi": torch.zeros(1, 2, 2), "lesion_present": 0}
    transform = RandPromptd(sequence_weights=[0.2, 0.2, 0.6])
    transform.set_random_state(0)
    drawn = np.bincount([transform(item)["sequence"] for _ in range(2000)], minlength=3) / 2000
    np.testing.assert_allclose(drawn, [0.2, 0.2, 0.6], atol=0.04)
    only_dwi = RandPromptd(sequence_weights=[0, 0, 1])
    assert {only_dwi(item)["sequence"] for _ in range(20)} == {2}
    with pytest.raises(ValueError, match="one non-negative weight per sequence"):
        RandPromptd(sequence_weights=[1, 1])
