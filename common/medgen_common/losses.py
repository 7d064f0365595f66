"""Losses shared by the bundles: a pluggable perceptual loss and the KL term of variational autoencoders."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .metrics import RandomFeatureExtractor

__all__ = ["kl_divergence", "RandomFeaturePerceptualLoss", "ChannelwisePerceptualLoss", "load_perceptual_loss"]


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
