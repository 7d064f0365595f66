"""Training engines, losses and sampling shared by the latent diffusion bundles."""

from __future__ import annotations

import pytest
from ignite.engine import Events
import torch
from monai.inferers import DiffusionInferer
from monai.losses import FocalLoss
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDPMScheduler

from medgen_common.engines import (
    AdversarialReferee,
    AutoencoderGanTrainer,
    LatentDiffusionPrepareBatch,
    ReconstructionInferer,
    apply_output_activation,
    compute_latent_scale_factor,
    fit_output_temperature,
)
from medgen_common.guidance import NULL_CONTEXT_VALUE
from medgen_common.losses import RandomFeaturePerceptualLoss, kl_divergence, load_perceptual_loss
from medgen_common.sampling import (
    LatentDiffusionSampler,
    SeededNoisePrepareBatch,
    make_sample_specs,
    make_scheduler,
    step_noise_seed,
)
from medgen_common.transforms import normalise_probabilities


def _label_batch(batch_size=4, channels=4, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, channels, size, size, generator=generator) * 3
    return torch.stack([normalise_probabilities(torch.softmax(l, 0), recompute_background=False) for l in logits])


def _tiny_autoencoder(channels=4, latent_channels=2):
    return AutoencoderKL(
        spatial_dims=2, in_channels=channels, out_channels=channels, channels=(8, 16), num_res_blocks=1,
        attention_levels=(False, False), latent_channels=latent_channels, norm_num_groups=4,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )  # fmt: skip


def test_kl_divergence_is_zero_for_standard_normal_and_positive_otherwise():
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert kl_divergence(mu, sigma).item() == pytest.approx(0.0, abs=1e-6)
    # 0.5 * (mu^2) summed over 3*4*4 = 48 positions with mu = 1
    assert kl_divergence(mu + 1, sigma).item() == pytest.approx(24.0, rel=1e-5)


def test_autoencoder_gan_trainer_learns_a_fixed_batch():
    torch.manual_seed(0)
    labels = _label_batch()
    autoencoder, discriminator = _tiny_autoencoder(), PatchDiscriminator(
        spatial_dims=2, in_channels=4, channels=8, num_layers_d=2
    )
    trainer = AutoencoderGanTrainer(
        device="cpu", max_epochs=40, train_data_loader=[{"label": labels}], autoencoder=autoencoder,
        discriminator=discriminator, g_optimizer=torch.optim.Adam(autoencoder.parameters(), 1e-3),
        d_optimizer=torch.optim.Adam(discriminator.parameters(), 1e-3),
        reconstruction_loss=FocalLoss(gamma=3.0, use_softmax=False), kl_weight=1e-6,
        perceptual_loss=RandomFeaturePerceptualLoss(2, 4), perceptual_weight=0.01, adversarial_weight=0.01,
        output_activation="softmax", image_key="label",
    )  # fmt: skip
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output))
    trainer.run()
    first, last = losses[0], losses[-1]
    assert last["reconstruction"] < 0.7 * first["reconstruction"]
    assert all(torch.isfinite(step[key]) for step in losses for key in step)
    assert last["discriminator"] > 0 and last["perceptual"] > 0 and last["kl"] > 0


def test_adversarial_terms_wait_for_warmup():
    labels = _label_batch()
    autoencoder, discriminator = _tiny_autoencoder(), PatchDiscriminator(
        spatial_dims=2, in_channels=4, channels=8, num_layers_d=2
    )
    trainer = AutoencoderGanTrainer(
        device="cpu", max_epochs=3, train_data_loader=[{"image": labels}], autoencoder=autoencoder, discriminator=discriminator,
        g_optimizer=torch.optim.Adam(autoencoder.parameters(), 1e-3), d_optimizer=torch.optim.Adam(discriminator.parameters(), 1e-3),
        reconstruction_loss=torch.nn.L1Loss(), adversarial_weight=0.1, adversarial_warmup_iterations=2,
    )  # fmt: skip
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(engine.state.output))
    trainer.run()
    assert [float(o["discriminator"]) == 0.0 for o in outputs] == [True, True, False]


def test_reconstruction_inferer_returns_probabilities():
    output = ReconstructionInferer("softmax")(_label_batch(2), _tiny_autoencoder().eval())
    assert output.shape == (2, 4, 16, 16)
    torch.testing.assert_close(output.sum(1), torch.ones(2, 16, 16))


def test_unknown_output_activation_is_rejected():
    with pytest.raises(ValueError, match="output activation"):
        ReconstructionInferer("tanh")(_label_batch(1), _tiny_autoencoder())


def test_latent_prepare_batch_encodes_pads_and_drops_conditions():
    torch.manual_seed(0)
    autoencoder = _tiny_autoencoder()
    condition = torch.rand(64, 1, 4)
    prepare = LatentDiffusionPrepareBatch(
        num_train_timesteps=1000, autoencoder=autoencoder, scale_factor=0.5, condition_name="c", condition_dropout=0.5,
        image_key="label", ldm_latent_shape=[12, 12],
    )  # fmt: skip
    latents, target, args, kwargs = prepare({"label": _label_batch(64, size=20), "c": condition}, device="cpu")
    assert latents.shape == (64, 2, 12, 12)  # 20 -> latent 10 (one down-sampling), padded to 12
    assert type(latents) is torch.Tensor  # not a MetaTensor from the pad: that slows every op of the network
    assert torch.equal(latents[:, :, 0], torch.zeros_like(latents[:, :, 0]))  # the padded border is zero
    assert torch.equal(target, kwargs["noise"]) and kwargs["timesteps"].shape == (64,)
    dropped = (kwargs["condition"] == NULL_CONTEXT_VALUE).all(-1).flatten()
    kept = (kwargs["condition"] == condition).all(-1).flatten()
    assert torch.all(dropped ^ kept)
    assert 15 < int(dropped.sum()) < 49  # Binomial(64, 0.5): outside this range with probability < 1e-3


def test_latent_scale_factor_is_inverse_latent_std():
    autoencoder = _tiny_autoencoder().eval()
    torch.manual_seed(0)
    batch = _label_batch(8)
    factor = compute_latent_scale_factor(autoencoder, [{"image": batch}], "cpu")
    torch.manual_seed(0)
    std = autoencoder.encode_stage_2_inputs(batch).std()
    assert factor == pytest.approx(1 / float(std), rel=0.05)


class _UnderConfidentAutoencoder(torch.nn.Module):
    """Decodes the target's log-probabilities times 0.4: a softmax flatter than the target, as focal losses leave it."""

    def reconstruct(self, x):
        return 0.4 * torch.log(x.clamp_min(1e-6))


def test_output_temperature_restores_calibrated_probabilities():
    batches = [{"label": _label_batch(4, seed=seed)} for seed in range(3)]
    temperature = fit_output_temperature(_UnderConfidentAutoencoder(), batches, "cpu", "label")
    assert temperature == pytest.approx(0.4, rel=0.02)
    target = batches[0]["label"]
    logits = _UnderConfidentAutoencoder().reconstruct(target)
    calibrated = apply_output_activation(logits, "softmax", temperature)
    assert torch.allclose(calibrated, target, atol=0.01)
    assert not torch.allclose(apply_output_activation(logits, "softmax"), target, atol=0.05)
    assert torch.equal(calibrated.argmax(1), apply_output_activation(logits, "softmax").argmax(1))
    with pytest.raises(ValueError, match="empty"):
        fit_output_temperature(_UnderConfidentAutoencoder(), [], "cpu", "label")


def test_random_feature_perceptual_loss_is_frozen_and_seeded():
    a, b = RandomFeaturePerceptualLoss(2, 4, seed=3), RandomFeaturePerceptualLoss(2, 4, seed=3)
    x, y = _label_batch(2), _label_batch(2, seed=1)
    assert a(x, y).item() == pytest.approx(b(x, y).item())
    assert a(x, x).item() == 0.0 and a(x, y).item() > 0
    assert not any(p.requires_grad for p in a.parameters())
    assert RandomFeaturePerceptualLoss(2, 4, seed=4)(x, y).item() != pytest.approx(a(x, y).item())


def test_pretrained_perceptual_loss_without_weights_fails_clearly(tmp_path):
    missing = tmp_path / "vgg.pth"
    with pytest.raises(FileNotFoundError, match="vgg.pth.*Nothing is downloaded"):
        load_perceptual_loss("vgg", 2, 4, str(missing))
    with pytest.raises(FileNotFoundError, match="weights_path=None"):
        load_perceptual_loss("medicalnet_resnet10_23datasets", 3, 1, None)


def test_sample_specs_are_reproducible_and_follow_ranges():
    specs = make_sample_specs(
        200, seed=7, condition_low=[0.2, 0.0], condition_high=[0.4, 0.0], condition_probability=0.5
    )
    again = make_sample_specs(
        200, seed=7, condition_low=[0.2, 0.0], condition_high=[0.4, 0.0], condition_probability=0.5
    )
    values = torch.stack([torch.as_tensor(s["lesion_size_condition"]) for s in specs]).reshape(200, 2)
    assert all(
        (s["seed"] == t["seed"]) and (s["lesion_size_condition"] == t["lesion_size_condition"]).all()
        for s, t in zip(specs, again)
    )
    on = values[:, 0] > 0
    assert 70 < int(on.sum()) < 130 and values[on, 0].min() >= 0.2 and values[on, 0].max() <= 0.4
    assert torch.all(values[:, 1] == 0)
    fixed = make_sample_specs(3, condition=[0.1, 0.9])
    assert [s["seed"] for s in fixed] == [0, 1, 2] and fixed[0]["lesion_size_condition"].shape == (1, 2)


def test_seeded_noise_does_not_depend_on_batch_composition():
    prepare = SeededNoisePrepareBatch([2, 4, 4], condition_name="c")
    batch_a = {"seed": torch.tensor([5, 6]), "c": torch.zeros(2, 1, 3)}
    batch_b = {"seed": torch.tensor([9, 5]), "c": torch.zeros(2, 1, 3)}
    noise_a, _, _, kwargs = prepare(batch_a, "cpu")
    noise_b, _, _, _ = prepare(batch_b, "cpu")
    assert torch.equal(noise_a[0], noise_b[1]) and not torch.equal(noise_a[0], noise_a[1])
    assert kwargs["conditioning"].shape == (2, 1, 3) and kwargs["seeds"] == [5, 6]
    with pytest.raises(ValueError, match=r"\[B, 1, L\]"):
        prepare({"seed": torch.tensor([1]), "c": torch.zeros(1, 3)}, "cpu")


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm"])
def test_schedulers_share_the_training_betas_and_do_not_clip(name):
    scheduler = make_scheduler(name)
    reference = make_scheduler("ddpm")
    torch.testing.assert_close(scheduler.betas, reference.betas)
    assert scheduler.betas[0].item() == pytest.approx(0.0015) and scheduler.betas[-1].item() == pytest.approx(0.0195)
    assert getattr(scheduler, "clip_sample", False) is False


def _gaussian_sample_std(scheduler, num_steps: int, data_std: float = 0.5, shrink: float = 0.0) -> float:
    """Std of 20,000 samples drawn with the exact epsilon of x0 ~ N(0, data_std^2) on ``num_steps`` steps
    (``shrink``: the epsilon scaled by ``1 - shrink``, a systematic error of a trained network)."""
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2000, 1, 10, generator=generator, dtype=torch.float64)  # [B, C, spatial]
    for t in scheduler.timesteps:
        alpha_bar = scheduler.alphas_cumprod[t].double()
        epsilon = (1 - shrink) * (1 - alpha_bar).sqrt() * sample / (alpha_bar * data_std**2 + 1 - alpha_bar)
        sample, _ = scheduler.step(epsilon, t, sample, generator=generator)
    return sample.std().item()


def test_ddpm_is_refused_off_the_training_grid_where_monai_s_step_is_wrong():
    """With the exact denoiser of a Gaussian, DDPM on the full grid recovers the data std, and DDIM(eta 1) approaches
    it as steps are added; MONAI's DDPM step on a skipped grid overshoots and does not converge (it uses one-step
    coefficients), so make_scheduler refuses it."""
    assert _gaussian_sample_std(make_scheduler("ddpm"), 1000) == pytest.approx(0.5, rel=0.03)
    ddim_errors = [abs(_gaussian_sample_std(make_scheduler("ddim", eta=1.0), n) - 0.5) for n in (50, 200)]
    assert ddim_errors[1] < ddim_errors[0] and ddim_errors[1] < 0.03
    monai_ddpm = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    assert all(_gaussian_sample_std(monai_ddpm, n) > 0.6 for n in (50, 200))  # measured 0.70 and 0.65
    with pytest.raises(ValueError, match="'ddpm' samples only on the 1000-step training grid.*use 'ddim' with eta 1"):
        make_scheduler("ddpm").set_timesteps(50)


def test_clipping_x0_keeps_long_cosine_grids_from_amplifying_a_systematic_epsilon_error():
    """On the cosine schedule (last beta 0.999) an epsilon error is amplified by 1 / sqrt(alpha_bar) in the first
    steps, more so the closer the grid starts to t = 999: with an epsilon 3 % too small, DDIM's sample std drifts
    from 0.49 (50 steps) to 0.65 (500); bounding x0 to 6 data SDs holds it at 0.56."""
    settings = {"schedule": "cosine", "timestep_spacing": "leading"}
    free = [_gaussian_sample_std(make_scheduler("ddim", **settings), n, shrink=0.03) for n in (50, 500)]
    bounded = _gaussian_sample_std(
        make_scheduler("ddim", clip_sample=True, clip_sample_range=3.0, **settings), 500, shrink=0.03
    )
    assert free[1] > free[0] + 0.05 and bounded < free[1] - 0.05
    assert _gaussian_sample_std(make_scheduler("ddim", clip_sample=True, clip_sample_range=3.0, **settings), 500) == (
        pytest.approx(_gaussian_sample_std(make_scheduler("ddim", **settings), 500))
    )  # an exact denoiser never reaches the bound
    with pytest.raises(ValueError, match="clip_sample applies to 'ddpm' and 'ddim' only, not 'heun'"):
        make_scheduler("heun", clip_sample=True)


def test_unknown_scheduler_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduler 'lms'"):
        make_scheduler("lms")
    with pytest.raises(ValueError, match="DDIM only"):
        make_scheduler("pndm", eta=1.0)
    with pytest.raises(ValueError, match="DDIM only"):
        make_scheduler("heun", timestep_spacing="leading")
    with pytest.raises(ValueError, match="EDM samplers"):
        make_scheduler("ddim", s_churn=40.0)


def test_step_noise_never_replays_a_samples_initial_noise():
    seeds = [0, 1, 2, 3]
    step_seed = step_noise_seed(seeds)
    assert step_seed not in seeds and step_seed == step_noise_seed(seeds) and step_seed != step_noise_seed([0, 1, 2, 4])
    initial = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(seeds[0]))
    first_step = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(step_seed))[0]
    assert not torch.allclose(initial, first_step)


def test_ddim_eta_set_at_construction_makes_plain_step_calls_stochastic():
    def last_step(scheduler, seed):
        scheduler.set_timesteps(10)
        scheduler.generator = torch.Generator().manual_seed(seed)
        sample, model_output = torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
        return scheduler.step(model_output, scheduler.timesteps[0], sample)[0]  # the inferers' call: no eta argument

    deterministic = make_scheduler("ddim")
    torch.testing.assert_close(last_step(deterministic, 0), last_step(deterministic, 1))
    stochastic = make_scheduler("ddim", eta=1.0)
    torch.testing.assert_close(last_step(stochastic, 0), last_step(stochastic, 0))
    assert not torch.allclose(last_step(stochastic, 0), last_step(stochastic, 1))
    spread = (last_step(stochastic, 0) - last_step(deterministic, 0)).std()
    assert spread > 0.05  # the DDPM posterior noise of one strided step
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("ddim", eta=1.5)


def _tiny_conditioned_unet():
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
        num_head_channels=(8, 16), norm_num_groups=4, with_conditioning=True, cross_attention_dim=4,
    )  # fmt: skip


def test_sampler_pads_latents_crops_back_and_returns_probability_maps():
    torch.manual_seed(0)
    autoencoder, unet = _tiny_autoencoder().eval(), _tiny_conditioned_unet().eval()
    sampler = LatentDiffusionSampler(
        autoencoder, make_scheduler("ddim"), num_inference_steps=3, spacing=[2.0, 2.0],
        ldm_latent_shape=[12, 12], autoencoder_latent_shape=[10, 10], verbose=False,
    )  # fmt: skip
    noise, _, _, kwargs = SeededNoisePrepareBatch([2, 12, 12], "c")(
        {"seed": torch.tensor([0, 1]), "c": torch.zeros(2, 1, 4)}
    )
    output = sampler(noise, unet, **kwargs)
    assert output.shape == (2, 4, 20, 20)  # latent 12 cropped to 10, decoded to 20
    torch.testing.assert_close(output.sum(1), torch.ones(2, 20, 20))
    assert output.meta["filename_or_obj"] == ["sample_000000", "sample_000001"]
    stochastic = LatentDiffusionSampler(
        autoencoder, make_scheduler("ddim", eta=1.0), num_inference_steps=3, ldm_latent_shape=[12, 12],
        autoencoder_latent_shape=[10, 10], verbose=False,
    )  # fmt: skip
    torch.testing.assert_close(
        stochastic(noise, unet, **kwargs), stochastic(noise, unet, **kwargs)
    )  # seeded step noise
    assert float(output.meta["affine"][0, 0, 0]) == 2.0


def test_lesion_condition_reaches_the_network_through_cross_attention():
    """Same seed, different lesion-size context: the diffusion output must change (the context is used)."""
    torch.manual_seed(0)
    unet = _tiny_conditioned_unet().eval()
    with torch.no_grad():  # MONAI zero-initialises output and attention projections: give them trained-like weights
        for parameter in unet.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.1)
    latent, timesteps = torch.randn(1, 2, 8, 8), torch.tensor([500])
    with torch.no_grad():
        without = unet(latent, timesteps, context=torch.zeros(1, 1, 4))
        with_tumour = unet(latent, timesteps, context=torch.tensor([[[0.0, 0.9, 0.0, 0.0]]]))
    assert not torch.allclose(without, with_tumour)
    inferer = DiffusionInferer(make_scheduler("ddpm"))
    loss_input = inferer(latent, unet, torch.randn_like(latent), timesteps, condition=torch.zeros(1, 1, 4))
    assert loss_input.shape == latent.shape


def test_referee_gates_generator_and_discriminator_by_recent_accuracy():
    referee = AdversarialReferee(n_steps=2, lower=0.65, upper=0.78)
    assert referee.accuracy is None and referee.train_generator and referee.train_discriminator
    # least-squares outputs read as probabilities by clamping: real 1, fake 0 is a perfect discriminator
    assert referee.update(torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)) == pytest.approx(1.0)
    assert referee.train_generator and not referee.train_discriminator
    assert referee.update(torch.full((2, 1, 4, 4), 0.5), torch.full((2, 1, 4, 4), 0.5)) == pytest.approx(0.5)
    assert referee.accuracy == pytest.approx(0.75)  # moving mean of the last 2 steps
    assert referee.train_generator and referee.train_discriminator
    referee.update(torch.full((1, 1, 4, 4), -3.0), torch.full((1, 1, 4, 4), 5.0))  # clamped to 0 and 1: accuracy 0
    assert referee.accuracy == pytest.approx(0.25)
    assert not referee.train_generator and referee.train_discriminator
    # the authors' sigmoid reading of logits: logit 0 is a coin toss
    assert AdversarialReferee(probability="sigmoid").update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)) == 0.5
    with pytest.raises(ValueError, match="lower <= upper"):
        AdversarialReferee(lower=0.9, upper=0.1)


def test_trainer_freezes_the_discriminator_while_the_referee_says_it_is_winning():
    labels = _label_batch()
    autoencoder, discriminator = _tiny_autoencoder(), PatchDiscriminator(
        spatial_dims=2, in_channels=4, channels=8, num_layers_d=2
    )
    referee = AdversarialReferee(n_steps=1, lower=0.0, upper=0.0)  # after one measurement D always counts as winning
    trainer = AutoencoderGanTrainer(
        device="cpu", max_epochs=3, train_data_loader=[{"image": labels}], autoencoder=autoencoder, discriminator=discriminator,
        g_optimizer=torch.optim.Adam(autoencoder.parameters(), 1e-3), d_optimizer=torch.optim.Adam(discriminator.parameters(), 1e-3),
        reconstruction_loss=torch.nn.L1Loss(), adversarial_weight=0.1, referee=referee,
    )  # fmt: skip
    snapshots = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: snapshots.append([p.detach().clone() for p in discriminator.parameters()]),
    )
    trainer.run()
    changed = [
        any(not torch.equal(a, b) for a, b in zip(before, after)) for before, after in zip(snapshots, snapshots[1:])
    ]
    assert changed == [False, False]  # trained in step 1 (no measurement yet), frozen in steps 2 and 3
    assert 0.0 <= float(trainer.state.output["discriminator_accuracy"]) <= 1.0
