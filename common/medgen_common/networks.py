"""Networks assembled from MONAI parts where no single MONAI class fits.

- :class:`StyleSpadeGenerator`: SPADE VAE-GAN generator (brainSPADE image generator) from MONAI's
  ``SPADEEncoder`` + ``SPADEDecoder``. The style encoder is always 2D (one style slice), the decoder is 2D or 3D, so
  one class serves the 2D model and the 3D model with a 2D style encoder.
- :class:`ContrastClassifier`: the modality/dataset classifier of the brainSPADE L_mod-dat loss, a MONAI
  ``DenseNet`` with one output per contrast and per dataset.
- :class:`Pix2PixUNetGenerator`: the pix2pix U-Net (kernel-4 stride-2 convolutions, pre-activation blocks,
  dropout as noise); MONAI's ``UNet`` cannot take kernel 4 and orders its layers differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DenseNet
from monai.networks.nets.spade_network import SPADEDecoder, SPADEEncoder
from torch import nn

__all__ = ["StyleSpadeGenerator", "ContrastClassifier", "Pix2PixUNetGenerator"]


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
        background_channel: label channel of the background; the output is 0 wherever the label map's most probable
            channel is this one, as in skull-stripped training images (else a segmenter z-scoring the non-zero
            voxels normalises a synthetic image over its whole frame). None: no mask.
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
        background_channel: int | None = None,
    ):
        super().__init__()
        if background_channel is not None and not 0 <= background_channel < label_nc:
            raise ValueError(f"background_channel must be in [0, {label_nc}) or None, got {background_channel}.")
        if spatial_dims not in (2, 3) or len(image_shape) != spatial_dims or len(style_shape) != 2:
            raise ValueError(
                f"need spatial_dims 2 or 3 with an image_shape of that length and a 2D style_shape, got "
                f"spatial_dims={spatial_dims}, image_shape={list(image_shape)}, style_shape={list(style_shape)}."
            )
        self.spatial_dims, self.label_nc, self.z_dim = spatial_dims, label_nc, z_dim
        self.background_channel = background_channel
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
        image = self.decoder(label, z)  # z always given: MONAI's z=None path fails on CPU
        if self.background_channel is None:
            return image
        return image * (label.argmax(1, keepdim=True) != self.background_channel).to(image.dtype)

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


class Pix2PixUNetGenerator(nn.Module):
    """pix2pix U-Net generator ``[B, in_channels, H, W] -> [B, out_channels, H, W]`` in [-1, 1] (Tanh).

    ``num_downs`` stride-2 convolutions (kernel 4) halve the image down to ``H / 2 ** num_downs``; the decoder
    mirrors them with transposed convolutions and concatenates each encoder output (skip connections). Encoder
    block: LeakyReLU(0.2) -> Conv -> BatchNorm (the outermost is Conv only, the innermost has no norm); decoder
    block: ReLU -> ConvTranspose -> BatchNorm, with Dropout(``dropout``) in the ``num_downs - 5`` blocks next to
    the innermost (pix2pix's noise); the outermost ends ReLU -> ConvTranspose -> Tanh. Widths are
    ``min(channels * 2 ** level, max_channels)``. Weights N(0, 0.02), norm scales N(1, 0.02).

    ``num_downs=7`` with ``channels=64`` is the V-EUS book's generator (decoder inputs 512, 1024, 1024, 1024, 512,
    256, 128; 41.8 M parameters); 8 is the authors' code (pix2pix ``unet_256``).

    Args:
        in_channels, out_channels: image channels (1 B-mode, 3 RGB elastogram).
        num_downs: number of down-samplings; H and W must be divisible by ``2 ** num_downs``.
        channels: width of the first level (pix2pix ``ngf``).
        max_channels: width cap (pix2pix ``8 * ngf``).
        dropout: dropout probability of the inner decoder blocks (0 disables).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 3,
        num_downs: int = 7,
        channels: int = 64,
        max_channels: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_downs < 2:
            raise ValueError(f"num_downs must be >= 2, got {num_downs}.")
        widths = [min(channels * 2**level, max_channels) for level in range(num_downs)]
        self.num_downs = num_downs
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for level, width in enumerate(widths):
            innermost, outermost = level == num_downs - 1, level == 0
            source = in_channels if outermost else widths[level - 1]
            down = [] if outermost else [nn.LeakyReLU(0.2)]
            down.append(nn.Conv2d(source, width, 4, stride=2, padding=1, bias=False))
            if not (outermost or innermost):
                down.append(nn.BatchNorm2d(width))
            self.down.append(nn.Sequential(*down))
            up_in = width if innermost else 2 * width
            if outermost:
                up = [nn.ReLU(), nn.ConvTranspose2d(up_in, out_channels, 4, stride=2, padding=1), nn.Tanh()]
            else:
                up_conv = nn.ConvTranspose2d(up_in, source, 4, stride=2, padding=1, bias=False)
                up = [nn.ReLU(), up_conv, nn.BatchNorm2d(source)]
                if dropout > 0 and 4 <= level < num_downs - 1:  # pix2pix's num_downs - 5 inner blocks
                    up.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*up))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        factor = 2**self.num_downs
        if image.ndim != 4 or image.shape[2] % factor or image.shape[3] % factor:
            raise ValueError(f"expected [B, C, H, W] with H and W divisible by {factor}, got {tuple(image.shape)}.")
        skips = []
        for down in self.down:
            image = down(image)
            skips.append(image)
        output = self.up[-1](skips[-1])
        for level in range(self.num_downs - 2, -1, -1):
            output = self.up[level](torch.cat([skips[level], output], 1))
        return output
