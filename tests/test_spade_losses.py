"""Tests of the SPADE VAE-GAN losses in medgen_common.losses: each checks a hand-computed value or a property the
brainSPADE image generator relies on (no tanh in the hinge, real features detached, batch-size-free KLD)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import MultiScalePatchDiscriminator

from medgen_common.losses import (
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    kl_divergence,
    kl_divergence_logvar,
    style_consistency_loss,
)


def _logits(*values: float) -> torch.Tensor:
    """A ``[B=1, C=1, 1, N]`` patch-logit map holding ``values``."""
    return torch.tensor(values).reshape(1, 1, 1, -1)


def _discriminator() -> MultiScalePatchDiscriminator:
    torch.manual_seed(0)
    return MultiScalePatchDiscriminator(
        num_d=2, num_layers_d=1, spatial_dims=2, channels=8, in_channels=3, norm="INSTANCE", minimum_size_im=32
    )


# --- hinge adversarial losses ----------------------------------------------------------------------------------------


def test_hinge_discriminator_loss_matches_hand_computed_value():
    # real: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5 -> mean 0.25; fake: relu(1 - 2) = 0, relu(1 + 0.5) = 1.5 -> mean 0.75
    loss = hinge_discriminator_loss([_logits(2.0, 0.5)], [_logits(-2.0, 0.5)])
    assert loss.item() == pytest.approx(1.0)


def test_hinge_generator_loss_is_minus_mean_fake_logit():
    assert hinge_generator_loss([_logits(-2.0, 0.5)]).item() == pytest.approx(0.75)
    assert hinge_generator_loss([_logits(3.0, 1.0)]).item() == pytest.approx(-2.0)


def test_single_tensor_is_one_scale():
    real, fake = _logits(2.0, 0.5), _logits(-2.0, 0.5)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)


def test_hinge_has_no_tanh_so_large_logits_stay_linear():
    # with tanh the D loss would be bounded by 4 and the G loss by [0, 2]; SPADE's hinge is linear in the logits
    assert hinge_discriminator_loss(_logits(-10.0), _logits(10.0)).item() == pytest.approx(22.0)
    assert hinge_discriminator_loss(_logits(-20.0), _logits(20.0)).item() == pytest.approx(42.0)
    assert hinge_generator_loss(_logits(100.0)).item() == pytest.approx(-100.0)
    assert hinge_generator_loss(_logits(-100.0)).item() == pytest.approx(100.0)


def test_generator_hinge_differs_from_monai_tanh_hinge_on_zero_logits():
    # the gotcha this function exists for: MONAI's hinge gives mean(1 - tanh(0)) = 1, SPADE's gives -mean(0) = 0
    zero = torch.zeros(1, 1, 4, 4)
    monai_hinge = PatchAdversarialLoss(criterion="hinge")(zero, target_is_real=True, for_discriminator=False)
    assert monai_hinge.item() == pytest.approx(1.0)
    assert hinge_generator_loss(zero).item() == pytest.approx(0.0)


def test_hinge_losses_average_over_scales():
    # scale 0 as in the hand-computed case (D 1.0, G 0.75); scale 1: D relu(1-0)+relu(1+1) = 3, G -1
    real = [_logits(2.0, 0.5), torch.zeros(1, 1, 2, 2)]
    fake = [_logits(-2.0, 0.5), torch.ones(1, 1, 2, 2)]
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx((1.0 + 3.0) / 2)
    assert hinge_generator_loss(fake).item() == pytest.approx((0.75 - 1.0) / 2)


def test_hinge_discriminator_loss_rejects_mismatched_or_empty_scales():
    with pytest.raises(ValueError, match="2 real and 1 fake scales"):
        hinge_discriminator_loss([_logits(1.0), _logits(1.0)], [_logits(1.0)])
    with pytest.raises(ValueError, match="real_logits.*empty"):
        hinge_discriminator_loss([], [])
    with pytest.raises(ValueError, match="fake_logits.*empty"):
        hinge_generator_loss([])


# --- feature matching ------------------------------------------------------------------------------------------------


def test_feature_matching_sums_layers_and_averages_scales():
    # scale 0: |0-1| + |0-2| = 3 over two layers; scale 1: |0-3| = 3 over one layer -> (3 + 3) / 2 scales = 3
    fake = [[torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 2, 2)], [torch.zeros(1, 2, 4, 4)]]
    real = [[torch.ones(1, 2, 4, 4), torch.full((1, 4, 2, 2), 2.0)], [torch.full((1, 2, 4, 4), 3.0)]]
    assert feature_matching_loss(fake, real).item() == pytest.approx(3.0)


def test_monai_discriminator_features_already_exclude_the_logits():
    # the feature lists are PatchDiscriminator outputs[:-1]: all of them are compared, none dropped again
    discriminator = _discriminator()
    images = torch.randn(2, 3, 32, 32)
    logits, features = discriminator(images)
    for scale, subnet in enumerate(discriminator.children()):
        outputs = subnet(images)
        assert len(features[scale]) == len(outputs) - 1
        assert torch.equal(logits[scale], outputs[-1])
        assert all(torch.equal(f, o) for f, o in zip(features[scale], outputs[:-1]))
    # every feature of the last layer before the logits counts: changing only it changes the loss
    fake = [[f.clone() for f in scale] for scale in features]
    fake[0][-1] = fake[0][-1] + 1.0
    assert feature_matching_loss(fake, features).item() == pytest.approx(1.0 / 2)


def test_feature_matching_is_zero_for_identical_inputs():
    discriminator = _discriminator()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, fake_features = discriminator(images)
    _, real_features = discriminator(images.clone())
    assert feature_matching_loss(fake_features, real_features).item() == 0.0


def test_feature_matching_gradient_reaches_fake_input_only():
    discriminator = _discriminator()
    generator = torch.Generator().manual_seed(2)
    fake_images = torch.randn(2, 3, 32, 32, generator=generator, requires_grad=True)
    real_images = torch.randn(2, 3, 32, 32, generator=generator, requires_grad=True)
    _, fake_features = discriminator(fake_images)
    _, real_features = discriminator(real_images)
    loss = feature_matching_loss(fake_features, real_features)
    assert loss.item() > 0
    loss.backward()
    assert fake_images.grad is not None and fake_images.grad.abs().sum() > 0
    assert real_images.grad is None


def test_feature_matching_rejects_mismatched_features():
    discriminator = _discriminator()
    _, features = discriminator(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="2 fake and 1 real scales"):
        feature_matching_loss(features, features[:1])
    with pytest.raises(ValueError, match="scale 1: .*3 fake and 2 real layers"):
        feature_matching_loss(features, [features[0], features[1][:-1]])
    _, larger = discriminator(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="scale 0, layer 0: .*shape"):
        feature_matching_loss(features, larger)
    with pytest.raises(ValueError, match="at least one"):
        feature_matching_loss([], [])


# --- KL divergence from log-variance ---------------------------------------------------------------------------------


def test_kld_is_zero_for_standard_normal_posterior():
    assert kl_divergence_logvar(torch.zeros(3, 8), torch.zeros(3, 8)).item() == 0.0


def test_kld_of_unit_mean_is_half_per_latent_dim():
    # -0.5 * (1 + 0 - 1 - exp(0)) = 0.5 per element, summed over 8 dims
    assert kl_divergence_logvar(torch.ones(3, 8), torch.zeros(3, 8)).item() == pytest.approx(4.0)


def test_kld_of_doubled_variance():
    # -0.5 * (1 + log 2 - 0 - 2) = 0.5 * (1 - log 2) per element
    loss = kl_divergence_logvar(torch.zeros(1, 4), torch.full((1, 4), math.log(2.0)))
    assert loss.item() == pytest.approx(4 * 0.5 * (1 - math.log(2.0)))


def test_kld_is_averaged_not_summed_over_the_batch():
    mu, logvar = torch.randn(1, 16), torch.randn(1, 16)
    single = kl_divergence_logvar(mu, logvar)
    repeated = kl_divergence_logvar(mu.repeat(5, 1), logvar.repeat(5, 1))
    assert repeated.item() == pytest.approx(single.item())


def test_kld_logvar_agrees_with_sigma_form():
    mu, logvar = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    expected = kl_divergence(mu, torch.exp(0.5 * logvar))
    assert kl_divergence_logvar(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kld_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence_logvar(torch.zeros(2, 8), torch.zeros(2, 4))


# --- style (slice) consistency ---------------------------------------------------------------------------------------


def test_style_consistency_is_zero_for_parallel_codes():
    z = torch.randn(4, 16)
    assert style_consistency_loss(z, 3.0 * z).item() == pytest.approx(0.0, abs=1e-6)


def test_style_consistency_is_one_for_orthogonal_codes():
    assert style_consistency_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item() == pytest.approx(1.0)


def test_style_consistency_is_two_for_opposite_codes():
    z = torch.randn(4, 16)
    assert style_consistency_loss(z, -0.5 * z).item() == pytest.approx(2.0)


def test_style_consistency_averages_over_the_batch_and_flattens_codes():
    z_a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    z_b = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]).reshape(2, 1, 2, 2)
    assert style_consistency_loss(z_a, z_b).item() == pytest.approx((0.0 + 1.0) / 2)


def test_style_consistency_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        style_consistency_loss(torch.zeros(2, 8), torch.zeros(2, 4))
