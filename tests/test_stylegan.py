"""The CSG mask generator (paper §2.2.1): a compact StyleGAN2 of semantic masks, its losses, trainer and the
finding filter."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medgen_common.stylegan import (
    ModulatedConv2d,
    StyleGan2Discriminator,
    StyleGan2Generator,
    StyleGanTrainer,
    finding_filter,
    logistic_discriminator_loss,
    masks_to_one_hot,
    minibatch_stddev,
    nonsaturating_generator_loss,
    r1_penalty,
    sample_filtered_masks,
)

TINY = {"channel_base": 256, "channel_max": 32}  # widths 32, 32, 16 at 4, 8, 16 px


def _tiny_networks(num_classes: int = 4, resolution: int = 16):
    generator = StyleGan2Generator(num_classes, resolution, latent_dim=32, w_dim=32, mapping_layers=2, **TINY)
    return generator, StyleGan2Discriminator(num_classes, resolution, **TINY)


def _band_masks(count: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Layered masks ``[count, 1, size, size]``: background on top, then bands of classes 1, 2, 3 (depth jittered)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(count, 1, size, size, dtype=torch.long)
    for index in range(count):
        top = 7 + int(torch.randint(0, 3, (1,), generator=generator))
        labels[index, 0, top : top + 4], labels[index, 0, top + 4 : top + 6], labels[index, 0, top + 6 :] = 1, 2, 3
    return labels


# --- networks --------------------------------------------------------------------------------------------------------


def test_generator_and_discriminator_shapes_at_demo_resolution():
    torch.manual_seed(0)
    demo = {"channel_base": 2048, "channel_max": 128}  # widths 128 up to 16 px, then 64, 32
    generator = StyleGan2Generator(8, 64, latent_dim=128, w_dim=128, mapping_layers=4, **demo)
    discriminator = StyleGan2Discriminator(8, 64, **demo)
    logits = generator(torch.randn(3, 128))
    assert logits.shape == (3, 8, 64, 64)
    assert discriminator(torch.softmax(logits, dim=1)).shape == (3,)
    with pytest.raises(ValueError, match=r"z must be \[B, 128\]"):
        generator(torch.randn(3, 64))
    with pytest.raises(ValueError, match="power of two"):
        StyleGan2Generator(8, 48)


def test_generator_and_discriminator_forward_at_full_resolution():
    torch.manual_seed(0)
    generator, discriminator = StyleGan2Generator(8, 256), StyleGan2Discriminator(8, 256)
    with torch.no_grad():
        logits = generator(torch.randn(1, 512))
        assert logits.shape == (1, 8, 256, 256)
        assert discriminator(torch.softmax(logits, dim=1)).shape == (1,)


def test_truncation_zero_maps_every_latent_to_the_average_mask():
    torch.manual_seed(0)
    generator = _tiny_networks()[0]
    generator(torch.randn(64, 32))  # training mode: tracks the average w
    generator.eval()
    z = torch.randn(2, 32)
    untruncated, truncated = generator(z), generator(z, truncation_psi=0.0)
    assert not torch.allclose(untruncated[0], untruncated[1], atol=1e-3)
    # the noise strengths start at 0, so the average w alone determines the output
    assert torch.allclose(truncated[0], truncated[1], atol=1e-5)
    assert torch.allclose(truncated[0:1], generator.synthesis(generator.mapping.w_avg[None]), atol=1e-5)


def test_demodulation_gives_unit_variance_outputs_for_unit_variance_inputs():
    torch.manual_seed(0)
    demodulated = ModulatedConv2d(64, 16, 3, w_dim=8, demodulate=True)
    plain = ModulatedConv2d(64, 16, 3, w_dim=8, demodulate=False)
    plain.load_state_dict(demodulated.state_dict())
    x, w = torch.randn(4, 64, 48, 48), 3 * torch.randn(4, 8)  # large w: styles far from 1
    with torch.no_grad():
        variance = demodulated(x, w)[..., 1:-1, 1:-1].var(dim=(2, 3))  # [B, out]; borders see zero padding
        plain_variance = plain(x, w)[..., 1:-1, 1:-1].var(dim=(2, 3))
    assert variance.shape == (4, 16)
    assert torch.allclose(variance, torch.ones_like(variance), atol=0.1)
    assert (plain_variance - 1).abs().max() > 0.5  # without demodulation the styles change the output scale


def test_modulated_upsampling_conv_doubles_the_size():
    conv = ModulatedConv2d(4, 6, 3, w_dim=8, up=True)
    assert conv(torch.randn(2, 4, 5, 7), torch.randn(2, 8)).shape == (2, 6, 10, 14)


def test_minibatch_stddev_is_zero_for_identical_samples_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    same = torch.randn(1, 6, 4, 4, generator=generator).repeat(4, 1, 1, 1)
    out = minibatch_stddev(same, group_size=4)
    assert out.shape == (4, 7, 4, 4)
    assert out[:, 6].max() < 1e-3
    # groups of gcd(4, 6) = 2 samples; the std of two N(0, 1) draws averages 0.56
    assert minibatch_stddev(torch.randn(6, 6, 4, 4, generator=generator), group_size=4)[:, 6].min() > 0.3


# --- losses ----------------------------------------------------------------------------------------------------------


def test_logistic_losses_on_known_logits():
    zero = torch.zeros(5)
    assert logistic_discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert nonsaturating_generator_loss(zero).item() == pytest.approx(math.log(2))
    # a discriminator that is sure and right has (almost) no loss; fooled, it has a large one
    high, low = torch.full((5,), 10.0), torch.full((5,), -10.0)
    assert logistic_discriminator_loss(high, low).item() == pytest.approx(2 * math.log1p(math.exp(-10)))
    assert logistic_discriminator_loss(low, high).item() == pytest.approx(20.0, rel=1e-4)
    # the generator's loss is large when its samples are called fake, and falls as their logits rise
    assert nonsaturating_generator_loss(low).item() == pytest.approx(10.0, rel=1e-4)
    fake = torch.tensor([-2.0, 0.0, 2.0], requires_grad=True)
    nonsaturating_generator_loss(fake).backward()
    assert torch.all(fake.grad < 0)


def test_r1_penalty_is_zero_for_a_constant_discriminator_and_the_squared_gradient_norm_otherwise():
    real = torch.rand(3, 2, 4, 4, requires_grad=True)
    constant = nn.Parameter(torch.tensor(0.7))
    assert r1_penalty(constant.expand(3), real).item() == 0.0  # output does not use the input at all
    assert r1_penalty(real.flatten(1).sum(1) * 0 + constant, real).item() == 0.0
    slope = torch.randn(2, 4, 4)
    linear_logits = (real * slope).flatten(1).sum(1)  # gradient w.r.t. each input is `slope`
    penalty = r1_penalty(linear_logits, real)
    assert penalty.item() == pytest.approx(slope.square().sum().item(), rel=1e-5)

    torch.manual_seed(0)
    discriminator = _tiny_networks()[1]
    masks = masks_to_one_hot(_band_masks(4), 4).requires_grad_(True)
    penalty = r1_penalty(discriminator(masks), masks)
    assert penalty.item() > 0
    penalty.backward()  # differentiable in the discriminator's weights, so it can be minimised
    assert discriminator.from_classes.weight.grad.abs().sum() > 0


def test_masks_to_one_hot_accepts_label_maps_and_one_hot_masks():
    labels = torch.tensor([[[[0, 1], [3, 2]]]])
    one_hot = masks_to_one_hot(labels.float(), 4)
    assert one_hot.shape == (1, 4, 2, 2) and torch.equal(one_hot.argmax(1, keepdim=True), labels)
    assert torch.equal(masks_to_one_hot(one_hot, 4), one_hot)
    with pytest.raises(ValueError, match=r"label values must be in \[0, 3\]"):
        masks_to_one_hot(labels + 1, 4)


# --- trainer ---------------------------------------------------------------------------------------------------------


def test_training_moves_the_generated_class_layout_toward_the_data():
    torch.manual_seed(0)
    generator, discriminator = _tiny_networks()
    masks = _band_masks(8)
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(123))

    def layout_error() -> float:
        """Mean |per-pixel class frequency of generated masks - that of the data| over classes and pixels."""
        generator.eval()
        with torch.no_grad():
            generated = nn.functional.one_hot(generator(z).argmax(1), 4).float().mean(0)
        generator.train()
        return (generated - nn.functional.one_hot(masks[:, 0], 4).float().mean(0)).abs().mean().item()

    before = layout_error()
    optimiser = lambda network: torch.optim.Adam(network.parameters(), 2e-3, betas=(0.0, 0.99))  # noqa: E731
    trainer = StyleGanTrainer(
        "cpu", max_epochs=60, train_data_loader=[{"label": masks}], generator=generator, discriminator=discriminator,
        g_optimizer=optimiser(generator), d_optimizer=optimiser(discriminator), r1_gamma=0.1, r1_interval=4,
    )  # fmt: skip
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(engine.state.output))
    trainer.run()
    after = layout_error()
    assert after < 0.5 * before, f"layout error {before:.3f} -> {after:.3f}"
    assert set(outputs[0]) == {"loss", "generator", "discriminator", "r1", "real_score", "fake_score"}
    # lazy R1: only every 4th iteration
    assert [bool(output["r1"] > 0) for output in outputs[:8]] == [False, False, False, True] * 2


def test_trainer_runs_with_ddp_wrapped_networks_and_updates_the_ema_generator(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        generator, discriminator = _tiny_networks()
        ema = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
        initial = [parameter.detach().clone() for parameter in ema.module.parameters()]
        wrapped_generator = DistributedDataParallel(generator)
        wrapped_discriminator = DistributedDataParallel(discriminator)
        trainer = StyleGanTrainer(
            "cpu", max_epochs=2, train_data_loader=[{"label": _band_masks(4)}], generator=wrapped_generator,
            discriminator=wrapped_discriminator, g_optimizer=torch.optim.Adam(wrapped_generator.parameters(), 1e-3),
            d_optimizer=torch.optim.Adam(wrapped_discriminator.parameters(), 1e-3), r1_gamma=1.0, r1_interval=1,
            ema_generator=ema,
        )  # fmt: skip
        trainer.run()
    finally:
        torch.distributed.destroy_process_group()
    assert trainer.state.output["r1"] > 0
    changed = [not torch.equal(a, b) for a, b in zip(initial, ema.module.parameters())]
    assert any(changed)
    # the EMA lags the trained weights
    assert any(not torch.equal(a, b) for a, b in zip(ema.module.parameters(), generator.parameters()))


# --- finding filter --------------------------------------------------------------------------------------------------


def test_finding_filter_keeps_only_masks_meeting_the_threshold():
    labels = torch.zeros(4, 1, 8, 8, dtype=torch.long)
    labels[0, 0, 1:4, 1:4] = 4  # a 9-pixel DITF region
    labels[1, 0, 1:3, 1] = 4  # 2 DITF pixels
    labels[2, 0, ::2, ::2] = 4  # 16 scattered DITF pixels, none connected
    labels[3, 0, 1:4, 1:4] = 5  # a 9-pixel calcification, no DITF
    assert finding_filter(labels, 4, min_pixels=5).tolist() == [True, False, True, False]
    assert finding_filter(labels, 4, min_pixels=5, min_component_pixels=5).tolist() == [True, False, False, False]
    assert finding_filter(labels[:, 0], [4, 5], min_pixels=9).tolist() == [True, False, True, True]


class _HalfFindingGenerator(nn.Module):
    """Stub generator of 8x8 two-class masks: a 4x4 finding (class 1) exactly when ``z[:, 0] > 0``."""

    latent_dim = 4

    def __init__(self, finding_scale: float = 1.0):
        super().__init__()
        self.finding_scale = nn.Parameter(torch.tensor(finding_scale))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        logits = torch.zeros(z.shape[0], 2, 8, 8)
        logits[:, 1, :4, :4] = (z[:, 0] * self.finding_scale)[:, None, None]
        return logits


def test_sample_filtered_masks_draws_until_enough_pass():
    state = torch.random.get_rng_state()
    masks = sample_filtered_masks(_HalfFindingGenerator(), 10, finding_classes=1, min_pixels=16, batch_size=4, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded draws leave the global state alone
    assert masks.shape == (10, 1, 8, 8) and masks.dtype == torch.long
    assert torch.all((masks == 1).flatten(1).sum(1) == 16)
    again = sample_filtered_masks(_HalfFindingGenerator(), 10, finding_classes=1, min_pixels=16, batch_size=4, seed=0)
    assert torch.equal(masks, again)
    sample_filtered_masks(_HalfFindingGenerator(), 10, finding_classes=1, min_pixels=16, batch_size=4)
    assert not torch.equal(torch.random.get_rng_state(), state)  # without a seed the global stream moves on


def test_sample_filtered_masks_raises_after_max_draws():
    with pytest.raises(RuntimeError, match="only 0 of 32 generated masks have >= 1 pixels of class"):
        sample_filtered_masks(_HalfFindingGenerator(finding_scale=0.0), 5, finding_classes=1, max_draws=32)
    torch.manual_seed(0)
    generator = _tiny_networks()[0]
    labels = sample_filtered_masks(generator, 2, finding_classes=[1, 2, 3], min_pixels=1, seed=1)
    assert labels.shape == (2, 1, 16, 16) and generator.training  # the training mode is restored
