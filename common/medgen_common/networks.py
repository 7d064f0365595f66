"""Networks assembled from MONAI parts where no single MONAI class fits.

- :class:`StyleSpadeGenerator`: SPADE VAE-GAN generator (brainSPADE image generator) from MONAI's
  ``SPADEEncoder`` + ``SPADEDecoder``. The style encoder is always 2D (one style slice), the decoder is 2D or 3D, so
  one class serves the 2D model and the 3D model with a 2D style encoder.
- :class:`ContrastClassifier`: the modality/dataset classifier of the brainSPADE L_mod-dat loss, a MONAI
  ``DenseNet`` with one output per contrast and per dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DenseNet
from monai.networks.nets.spade_network import SPADEDecoder, SPADEEncoder
from torch import nn

__all__ = ["StyleSpadeGenerator", "ContrastClassifier"]


class StyleSpadeGenerator(nn.Module):
    """Label map + style slice -> image, as a VAE-GAN generator.

    ``forward(label, style)`` encodes the style slice ``[B, 1, *style_shape]`` (2D) to ``z ~ N(mu, exp(logvar))``
    (``z_dim``) and decodes it, modulated by the label map ``[B, label_nc, *image_shape]`` through SPADE blocks, into
    an image ``[B, out_channels, *image_shape]``. Returns ``(image, mu, logvar)``.

    Args:
        spatial_dims: 2 or 3, the dimensionality of the label map and the output image.
        label_nc: channels of the (soft) label map.
        image_shape: output spatial shape; each size divisible by ``2 ** len(decoder_channels)``.
        style_shape: 2D style-slice shape; each size divisible by ``2 ** len(encoder_channels)``.
        encoder_channels: widths of the encoder's stride-2 convolutions.
        decoder_channels: widths of the decoder's SPADE residual blocks, from the coarsest.
        z_dim: style-code size.
        spade_intermediate_channels: hidden width of the SPADE normalisation's label MLP.
        out_channels: image channels.
        norm: normalisation of encoder and decoder (``"INSTANCE"`` as the brainSPADE repositories).
    """

    def __init__(
        self,
        spatial_dims: int,
        label_nc: int,
        image_shape: Sequence[int],
        style_shape: Sequence[int],
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        z_dim: int = 256,
        spade_intermediate_channels: int = 128,
        out_channels: int = 1,
        norm: str = "INSTANCE",
    ):
        super().__init__()
        if spatial_dims not in (2, 3) or len(image_shape) != spatial_dims or len(style_shape) != 2:
            raise ValueError(
                f"need spatial_dims 2 or 3 with an image_shape of that length and a 2D style_shape, got "
                f"spatial_dims={spatial_dims}, image_shape={list(image_shape)}, style_shape={list(style_shape)}."
            )
        self.spatial_dims, self.label_nc, self.z_dim = spatial_dims, label_nc, z_dim
        # MONAI's SPADE classes append to the channel list they are given: hand them fresh copies
        self.encoder = SPADEEncoder(
            spatial_dims=2, in_channels=1, z_dim=z_dim, channels=list(encoder_channels),
            input_shape=list(style_shape), norm=norm,
        )  # fmt: skip
        self.decoder = SPADEDecoder(
            spatial_dims=spatial_dims, out_channels=out_channels, label_nc=label_nc, input_shape=list(image_shape),
            channels=list(decoder_channels), z_dim=z_dim, is_vae=True,
            spade_intermediate_channels=spade_intermediate_channels, norm=norm,
        )  # fmt: skip

    def encode(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Style slices ``[B, 1, H, W]`` -> ``(mu, logvar)``, each ``[B, z_dim]``."""
        return self.encoder(style)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised style code ``mu + exp(logvar / 2) * eps``."""
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * noise

    def decode(self, label: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Label map ``[B, label_nc, *image_shape]`` and style code ``[B, z_dim]`` -> image."""
        if label.shape[1] != self.label_nc:
            raise ValueError(f"label map has {label.shape[1]} channels, the generator expects {self.label_nc}.")
        return self.decoder(label, z)  # z always given: MONAI's z=None path fails on CPU

    def forward(self, label: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(style)
        return self.decode(label, self.sample(mu, logvar)), mu, logvar

    def generate(self, label: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Deterministic image from the style's posterior mean code."""
        return self.decode(label, self.encode(style)[0])


class ContrastClassifier(nn.Module):
    """Modality (and optionally dataset) classifier of 2D slices ``[B, 1, H, W]``: a MONAI ``DenseNet`` whose logits
    ``[B, num_contrasts + num_datasets]`` hold the contrast logits first, then the dataset logits (none when
    ``num_datasets`` is 0 or 1: nothing to tell apart). :meth:`split` separates them.

    Args:
        num_contrasts: number of image contrasts (e.g. T1, T2, FLAIR).
        num_datasets: number of source datasets.
        init_features, growth_rate, block_config: DenseNet widths (DenseNet121: 64, 32, (6, 12, 24, 16)).
        dropout_prob: dropout before the classification layer (0.2 as the brainSPADE classifier).
    """

    def __init__(
        self,
        num_contrasts: int,
        num_datasets: int = 0,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        dropout_prob: float = 0.2,
    ):
        super().__init__()
        if num_contrasts < 2:
            raise ValueError(f"a contrast classifier needs at least 2 contrasts, got {num_contrasts}.")
        self.num_contrasts = num_contrasts
        self.num_datasets = num_datasets if num_datasets > 1 else 0
        self.network = DenseNet(
            spatial_dims=2, in_channels=1, out_channels=num_contrasts + self.num_datasets,
            init_features=init_features, growth_rate=growth_rate, block_config=tuple(block_config),
            dropout_prob=dropout_prob,
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(contrast_logits [B, num_contrasts], dataset_logits [B, num_datasets])``."""
        return logits[:, : self.num_contrasts], logits[:, self.num_contrasts :]
