"""Losses shared by the bundles: a pluggable perceptual loss, the KL term of variational autoencoders and the
SPADE VAE-GAN losses of brainSPADE (hinge adversarial, feature matching, KLD from log-variance, style consistency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import RandomFeatureExtractor

__all__ = [
    "kl_divergence",
    "RandomFeaturePerceptualLoss",
    "ChannelwisePerceptualLoss",
    "load_perceptual_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "feature_matching_loss",
    "kl_divergence_logvar",
    "style_consistency_loss",
]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent channels and positions, averaged over the batch.

    Args:
        z_mu, z_sigma: ``[B, C, *spatial]`` latent mean and standard deviation (as returned by ``AutoencoderKL``).
    """
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


class RandomFeaturePerceptualLoss(nn.Module):
    """Random-feature perceptual proxy: mean L1 distance between the activations of each level of a frozen, seeded,
    randomly initialised conv pyramid (the one of :class:`~medgen_common.metrics.RandomFeatureExtractor`). It is
    *not* VGG, LPIPS or MedicalNet; it is the honest offline stand-in used at demo scale, since pretrained weights
    cannot be downloaded here (random conv features are an established texture/structure descriptor).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the compared tensors ``[B, C, *spatial]``.
        seed: initialisation seed; the same seed gives the same loss.
    """

    def __init__(self, spatial_dims: int, in_channels: int, seed: int = 0):
        super().__init__()
        self.extractor = RandomFeatureExtractor(spatial_dims, in_channels, seed=seed)

    def train(self, mode: bool = True) -> RandomFeaturePerceptualLoss:
        return super().train(False)  # always frozen

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, levels = prediction.new_zeros(()), 0
        for layer in self.extractor.features:
            prediction, target = layer(prediction), layer(target)
            if isinstance(layer, nn.LeakyReLU):  # the output of each pyramid level
                loss, levels = loss + (prediction - target).abs().mean(), levels + 1
        return loss / levels


def load_perceptual_loss(
    kind: str, spatial_dims: int, in_channels: int, weights_path: str | None = None, **kwargs
) -> nn.Module:
    """Build the perceptual loss named in a config.

    Args:
        kind: ``"random_features"`` (offline proxy, :class:`RandomFeaturePerceptualLoss`) or a
            ``monai.losses.PerceptualLoss`` network type such as ``"medicalnet_resnet10_23datasets"``,
            ``"radimagenet_resnet50"``, ``"vgg"``, ``"squeeze"``, whose weights must be at ``weights_path``.
        weights_path: local file of pretrained weights (never downloaded).

    Raises:
        FileNotFoundError: a pretrained network was named but ``weights_path`` is missing.
    """
    if kind == "random_features":
        return RandomFeaturePerceptualLoss(spatial_dims, in_channels, **kwargs)
    if weights_path is None or not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"perceptual loss '{kind}' needs pretrained weights at a local path, but weights_path={weights_path!r} "
            "does not exist. Nothing is downloaded at run time: place the weights file there (e.g. exported once on "
            "a connected machine), or use perceptual_kind='random_features' (the offline proxy) or a weight of 0."
        )
    from monai.losses import PerceptualLoss

    network = PerceptualLoss(
        spatial_dims=spatial_dims, network_type=kind, pretrained=True, pretrained_path=str(weights_path), **kwargs
    )
    return ChannelwisePerceptualLoss(network) if in_channels > 1 else network


class ChannelwisePerceptualLoss(nn.Module):
    """Apply a single-channel perceptual network to every channel as its own image (``[B, C, *s]`` is folded
    to ``[B*C, 1, *s]``), as the brainSPADE 2D repository applies LPIPS to label maps."""

    def __init__(self, perceptual: nn.Module):
        super().__init__()
        self.perceptual = perceptual

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fold = lambda x: x.reshape(-1, 1, *x.shape[2:])  # noqa: E731
        return self.perceptual(fold(prediction), fold(target))


# --- SPADE VAE-GAN losses (brainSPADE image generator: terms of Eq. 1.6 and L_cont of Eq. 1.5) ------------------------


def _as_scales(logits: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """One tensor is one discriminator scale; a list or tuple holds one tensor per scale."""
    scales = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not scales:
        raise ValueError(f"{name} must hold the logits of at least one discriminator scale, got an empty sequence.")
    return scales


def hinge_discriminator_loss(
    real_logits: torch.Tensor | Sequence[torch.Tensor], fake_logits: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """Discriminator hinge loss of SPADE, ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`` per scale,
    averaged over the scales.

    It acts on the raw logits: ``monai.losses.PatchAdversarialLoss(criterion="hinge")`` applies ``tanh`` first,
    which bounds the loss and is not the original SPADE objective.

    Args:
        real_logits, fake_logits: logits of real and generated inputs, one ``[B, C, *spatial]`` tensor per scale
            (the first output of ``MultiScalePatchDiscriminator.forward``), or a single tensor for one scale.

    Returns:
        Scalar loss.

    Raises:
        ValueError: a sequence is empty, or the two have different numbers of scales.
    """
    real_scales, fake_scales = _as_scales(real_logits, "real_logits"), _as_scales(fake_logits, "fake_logits")
    if len(real_scales) != len(fake_scales):
        raise ValueError(
            f"real_logits and fake_logits must come from the same discriminator scales, got {len(real_scales)} "
            f"real and {len(fake_scales)} fake scales."
        )
    losses = [F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean() for real, fake in zip(real_scales, fake_scales)]
    return torch.stack(losses).mean()


def hinge_generator_loss(fake_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss of SPADE (L_adv of Eq. 1.6), ``-mean(D(fake))`` per scale, averaged over the scales
    (no ``tanh``, unlike ``PatchAdversarialLoss(criterion="hinge")``).

    Args:
        fake_logits: logits of generated inputs, one ``[B, C, *spatial]`` tensor per scale, or a single tensor.

    Returns:
        Scalar loss.

    Raises:
        ValueError: ``fake_logits`` is an empty sequence.
    """
    return torch.stack([-fake.mean() for fake in _as_scales(fake_logits, "fake_logits")]).mean()


def feature_matching_loss(
    fake_features: Sequence[Sequence[torch.Tensor]], real_features: Sequence[Sequence[torch.Tensor]]
) -> torch.Tensor:
    """Discriminator feature matching of pix2pixHD/SPADE (L_feat of Eq. 1.6): the mean L1 distance between the
    intermediate features of fake and real inputs, summed over the layers of a scale and averaged over the scales
    (the repositories use L1, not the L2 written after Eq. 1.6). Real features are detached, so only the generator
    side receives gradients.

    The second output of ``monai.networks.nets.MultiScalePatchDiscriminator.forward`` already leaves out each
    scale's final output (the logits): it is ``PatchDiscriminator(x)[:-1]``. Every tensor given here is therefore
    compared. With a bare ``PatchDiscriminator``, pass ``outputs[:-1]`` for each scale.

    Args:
        fake_features, real_features: per scale, the list of intermediate features ``[B, C_l, *spatial_l]``.

    Returns:
        Scalar loss.

    Raises:
        ValueError: there is no scale or no layer, or the two differ in their number of scales, a scale's number of
            layers, or a layer's shape (the message names the scale and layer).
    """
    if len(fake_features) == 0:
        raise ValueError("fake_features must hold the features of at least one discriminator scale, got none.")
    if len(fake_features) != len(real_features):
        raise ValueError(
            f"fake_features and real_features must come from the same discriminator scales, got {len(fake_features)} "
            f"fake and {len(real_features)} real scales."
        )
    layer_losses = []
    for scale, (fake_layers, real_layers) in enumerate(zip(fake_features, real_features)):
        if len(fake_layers) != len(real_layers):
            raise ValueError(
                f"scale {scale}: fake and real must have the same number of feature layers, got {len(fake_layers)} "
                f"fake and {len(real_layers)} real layers."
            )
        for layer, (fake, real) in enumerate(zip(fake_layers, real_layers)):
            if fake.shape != real.shape:
                raise ValueError(
                    f"scale {scale}, layer {layer}: fake and real features must have the same shape, got "
                    f"{tuple(fake.shape)} fake and {tuple(real.shape)} real."
                )
            layer_losses.append(F.l1_loss(fake, real.detach()))
    if not layer_losses:
        raise ValueError("fake_features and real_features hold no feature layers to match.")
    return torch.stack(layer_losses).sum() / len(fake_features)


def kl_divergence_logvar(z_mu: torch.Tensor, z_logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of the SPADE style encoder (L_KLD of Eq. 1.6),
    ``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` summed over the latent dimensions and averaged over the batch.

    The SPADE/brainSPADE repositories also sum over the batch; averaging instead keeps the weight (λ_KLD = 0.05 in
    the repositories, tuned there for batch size 1) independent of the batch size. For ``AutoencoderKL``, which
    returns sigma rather than logvar, use :func:`kl_divergence`.

    Args:
        z_mu, z_logvar: ``[B, z_dim]`` (as returned by ``SPADENet.forward`` after the image) or ``[B, C, *spatial]``
            mean and log-variance of the posterior.

    Returns:
        Scalar loss.

    Raises:
        ValueError: the two shapes differ.
    """
    if z_mu.shape != z_logvar.shape:
        raise ValueError(
            f"z_mu and z_logvar must have the same shape, got {tuple(z_mu.shape)} and {tuple(z_logvar.shape)}."
        )
    kl = -0.5 * (1.0 + z_logvar - z_mu.pow(2) - z_logvar.exp())
    return kl.flatten(1).sum(1).mean()


def style_consistency_loss(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Slice-consistency loss of brainSPADE (L_cont, Eq. 1.5), the batch mean of ``1 - cos(z_a, z_b)``: 0 for codes
    that point the same way, 1 for orthogonal codes, 2 for opposite codes. The cosine is taken over all code
    dimensions of each sample. Eq. 1.5 writes the cosine similarity itself, which a minimised loss cannot use; the
    brainSPADE repositories (``--distance_metric cosim``) minimise ``1 - cos``, as here.

    Args:
        z_a, z_b: ``[B, z_dim]`` (or ``[B, *code_dims]``, flattened) style codes, e.g. of a style slice and of its
            random affine transform.

    Returns:
        Scalar loss in ``[0, 2]``.

    Raises:
        ValueError: the two shapes differ.
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}.")
    return (1.0 - F.cosine_similarity(z_a.flatten(1), z_b.flatten(1), dim=1)).mean()
