"""Mask generator of CSG (paper §2.2.1): a compact StyleGAN2 that draws multi-class semantic masks from noise, and
the paper's finding filter that keeps only masks with a significant pathology.

The paper fine-tunes StyleGAN2-ADA pretrained on BRECAHAD (breast-cancer histopathology). Those weights cannot be
obtained offline, so this generator is trained from scratch on the bundle's masks.

Kept from StyleGAN2 (Karras et al., CVPR 2020): a mapping network ``z -> w`` with pixel norm, a 0.01 learning-rate
multiplier and a tracked ``w`` average (truncation trick); equalised learning rate; a constant 4x4 input;
modulated convolutions with demodulation; per-layer noise inputs; the skip generator (per-resolution outputs
upsampled and summed); a residual discriminator with minibatch standard deviation; the non-saturating logistic loss
with lazy R1 regularisation; an exponential moving average of the generator (via
``torch.optim.swa_utils.AveragedModel``).

Simplified: bilinear upsampling and average-pool downsampling instead of the [1, 3, 3, 1] FIR filters; one ``w``
for all layers (no style-mixing regularisation); no path-length regularisation; no ADA. ADA (adaptive
discriminator augmentation) matters for few-shot fine-tuning; here, from scratch on a few hundred masks, it would be
the first thing to add (the same random flips / translations of real and generated masks before the
discriminator, with a probability tuned by the discriminator's overfitting).

Masks: the generator outputs class logits ``[B, C, H, W]`` (softmax: a soft mask; argmax: the label map). The
discriminator sees real masks one-hot and generated masks as softmax probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot
from scipy import ndimage
from torch import nn

from .engines import GanTrainerBase

__all__ = [
    "EqualLinear",
    "EqualConv2d",
    "ModulatedConv2d",
    "MappingNetwork",
    "StyleGan2Generator",
    "StyleGan2Discriminator",
    "minibatch_stddev",
    "logistic_discriminator_loss",
    "nonsaturating_generator_loss",
    "r1_penalty",
    "masks_to_one_hot",
    "StyleGanTrainer",
    "finding_filter",
    "sample_filtered_masks",
]

_ACTIVATION_GAIN = math.sqrt(2.0)  # keeps unit variance through LeakyReLU(0.2)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * _ACTIVATION_GAIN


def _unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` or ``AveragedModel`` wrapper."""
    return getattr(network, "module", network)


def _channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """StyleGAN2's width at a resolution: ``min(channel_base // resolution, channel_max)``."""
    return max(1, min(channel_base // resolution, channel_max))


def _check_resolution(resolution: int) -> int:
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}.")
    return int(math.log2(resolution))


class EqualLinear(nn.Module):
    """Fully connected layer with equalised learning rate: weights ``~ N(0, 1 / lr_multiplier)`` scaled at run time
    by ``lr_multiplier / sqrt(in_features)``; optional LeakyReLU(0.2) x sqrt(2). ``[B, in] -> [B, out]``."""

    def __init__(
        self, in_features: int, out_features: int, bias_init: float = 0.0, lr_multiplier: float = 1.0,
        activation: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_multiplier))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.lr_multiplier, self.activation = lr_multiplier, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_multiplier)
        return _lrelu(x) if self.activation else x


class EqualConv2d(nn.Module):
    """2D convolution with equalised learning rate (same padding); ``down`` average-pools by 2 first; optional
    LeakyReLU(0.2) x sqrt(2). ``[B, in, H, W] -> [B, out, H, W]`` (``H / 2, W / 2`` with ``down``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, activation: bool = False,
        down: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.activation, self.down = activation, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        return _lrelu(x) if self.activation else x


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution (Karras et al. 2020, Eqs. 1-3).

    The style ``s = A(w)`` (``[B, in_channels]``, affine initialised to 1) scales the input channels of the weight
    per sample, ``w'_oik = s_i w_oik``; with ``demodulate``, each output channel's weight is divided by its norm,
    ``w''_oik = w'_oik / sqrt(sum_ik w'_oik^2 + eps)``, so unit-variance inputs give unit-variance outputs. Runs as
    one grouped convolution over the batch. ``up`` upsamples the input by 2 (bilinear) first.

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv2d`` (same padding, no bias).
        w_dim: length of the latent ``w``.
        demodulate: normalise the modulated weights (off for the output layer).
        up: upsample by 2 before the convolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True,
        up: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.demodulate, self.up = demodulate, up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, in, H, W]``, ``w`` ``[B, w_dim]`` -> ``[B, out, H, W]`` (``2H, 2W`` with ``up``)."""
        batch, in_channels = x.shape[:2]
        styles = self.affine(w)
        weight = self.weight[None] * self.weight_gain * styles[:, None, :, None, None]  # [B, out, in, k, k]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = F.conv2d(
            x.reshape(1, batch * in_channels, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]).to(x.dtype),
            padding=self.weight.shape[-1] // 2, groups=batch,
        )  # fmt: skip
        return out.reshape(batch, -1, *out.shape[2:])


class MappingNetwork(nn.Module):
    """``z -> w``: pixel norm, then ``num_layers`` equalised FC layers with LeakyReLU and a learning-rate
    multiplier (0.01 in StyleGAN2). In training mode it tracks the average ``w`` (``w_avg``, momentum
    ``w_avg_beta``), the centre of the truncation trick ``w' = w_avg + psi (w - w_avg)``.
    """

    def __init__(
        self, latent_dim: int, w_dim: int, num_layers: int = 4, lr_multiplier: float = 0.01, w_avg_beta: float = 0.995
    ):
        super().__init__()
        dims = [latent_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[EqualLinear(a, b, lr_multiplier=lr_multiplier, activation=True) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """``z`` ``[B, latent_dim]`` -> ``w`` ``[B, w_dim]``."""
        w = self.layers(z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8))
        if self.training:
            self.w_avg.copy_(w.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w


class _SynthesisLayer(nn.Module):
    """Modulated conv, per-pixel noise with a learned strength (initially 0), bias, LeakyReLU x sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = self.conv(x, w)
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return _lrelu(x + noise * self.noise_strength + self.bias[None, :, None, None])


class _SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (constant input | upsampling conv) + conv, and its class-logit
    output (a 1x1 modulated conv without demodulation) added to the upsampled logits of the previous block."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, num_classes: int, first: bool):
        super().__init__()
        self.const = nn.Parameter(torch.randn(out_channels, 4, 4)) if first else None
        self.conv0 = None if first else _SynthesisLayer(in_channels, out_channels, w_dim, up=True)
        self.conv1 = _SynthesisLayer(out_channels, out_channels, w_dim)
        self.to_classes = ModulatedConv2d(out_channels, num_classes, 1, w_dim, demodulate=False)
        self.class_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor | None, logits: torch.Tensor | None, w: torch.Tensor):
        x = self.const[None].expand(w.shape[0], -1, -1, -1) if self.const is not None else self.conv0(x, w)
        x = self.conv1(x, w)
        y = self.to_classes(x, w) + self.class_bias[None, :, None, None]
        if logits is not None:
            y = y + F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
        return x, y


class StyleGan2Generator(nn.Module):
    """Compact StyleGAN2 generator of semantic masks: ``z`` ``[B, latent_dim]`` -> class logits
    ``[B, num_classes, resolution, resolution]``.

    Args:
        num_classes: mask classes, background included (8 for CSG's MSK masks).
        resolution: output side, a power of two >= 8 (64 demo, 256 full).
        latent_dim, w_dim: lengths of ``z`` and ``w``.
        mapping_layers: FC layers of the mapping network (8 in StyleGAN2; 2-4 suffice for masks).
        channel_base, channel_max: width at resolution ``r`` is ``min(channel_base // r, channel_max)``
            (StyleGAN2's 256-pixel configuration: 16384 and 512).
        mapping_lr_multiplier, w_avg_beta: see :class:`MappingNetwork`.
    """

    def __init__(
        self,
        num_classes: int,
        resolution: int = 256,
        latent_dim: int = 512,
        w_dim: int = 512,
        mapping_layers: int = 8,
        channel_base: int = 16384,
        channel_max: int = 512,
        mapping_lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ):
        super().__init__()
        levels = _check_resolution(resolution)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and a class), got {num_classes}.")
        self.num_classes, self.resolution, self.latent_dim, self.w_dim = num_classes, resolution, latent_dim, w_dim
        self.mapping = MappingNetwork(latent_dim, w_dim, mapping_layers, mapping_lr_multiplier, w_avg_beta)
        widths = [_channels_at(2**level, channel_base, channel_max) for level in range(2, levels + 1)]
        self.blocks = nn.ModuleList(
            _SynthesisBlock(widths[max(index - 1, 0)], width, w_dim, num_classes, first=index == 0)
            for index, width in enumerate(widths)
        )

    def synthesis(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` ``[B, w_dim]`` -> class logits ``[B, num_classes, resolution, resolution]``."""
        x = logits = None
        for block in self.blocks:
            x, logits = block(x, logits, w)
        return logits

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """``z`` ``[B, latent_dim]`` -> class logits ``[B, num_classes, resolution, resolution]``; ``truncation_psi``
        < 1 pulls ``w`` toward its average (less variety, more typical masks)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [B, {self.latent_dim}], got {tuple(z.shape)}.")
        return self.synthesis(self.mapping(z, truncation_psi))


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """Append the minibatch standard deviation (Karras et al. 2018): for groups of ``gcd(group_size, B)`` samples,
    the std over the group averaged over features and positions, ``num_channels`` maps.
    ``[B, C, H, W] -> [B, C + num_channels, H, W]``."""
    batch, channels, height, width = x.shape
    if channels % num_channels:
        raise ValueError(f"minibatch std channels ({num_channels}) must divide the feature channels ({channels}).")
    group = math.gcd(group_size, batch)
    y = x.float().reshape(group, -1, num_channels, channels // num_channels, height, width)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt().mean(dim=(2, 3, 4))  # [B / group, num_channels]
    y = y.reshape(-1, num_channels, 1, 1).repeat(group, 1, height, width)
    return torch.cat([x, y.to(x.dtype)], dim=1)


class _DiscriminatorBlock(nn.Module):
    """Residual block: two 3x3 convs (the second downsamples) plus a 1x1 downsampling skip, summed / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation=True)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation=True, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2.0)


class StyleGan2Discriminator(nn.Module):
    """Residual StyleGAN2 discriminator of masks: ``[B, num_classes, resolution, resolution]`` (one-hot or
    softmax probabilities) -> logits ``[B]`` (high: real).

    Args:
        num_classes, resolution, channel_base, channel_max: as :class:`StyleGan2Generator`.
        mbstd_group_size: samples per minibatch-std group (0 disables the minibatch-std layer).
        mbstd_num_channels: minibatch-std feature maps.
    """

    def __init__(
        self,
        num_classes: int,
        resolution: int = 256,
        channel_base: int = 16384,
        channel_max: int = 512,
        mbstd_group_size: int = 4,
        mbstd_num_channels: int = 1,
    ):
        super().__init__()
        levels = _check_resolution(resolution)
        self.num_classes, self.resolution = num_classes, resolution
        self.mbstd_group_size, self.mbstd_num_channels = mbstd_group_size, mbstd_num_channels
        widths = [_channels_at(2**level, channel_base, channel_max) for level in range(levels, 1, -1)]  # res ... 4
        self.from_classes = EqualConv2d(num_classes, widths[0], 1, activation=True)
        self.blocks = nn.Sequential(*[_DiscriminatorBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        extra = mbstd_num_channels if mbstd_group_size > 0 else 0
        self.conv = EqualConv2d(widths[-1] + extra, widths[-1], 3, activation=True)
        self.fc = EqualLinear(widths[-1] * 16, widths[-1], activation=True)
        self.out = EqualLinear(widths[-1], 1)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        expected = (self.num_classes, self.resolution, self.resolution)
        if masks.ndim != 4 or tuple(masks.shape[1:]) != expected:
            raise ValueError(
                f"the discriminator expects masks [B, {', '.join(map(str, expected))}], got {tuple(masks.shape)}."
            )
        x = self.blocks(self.from_classes(masks))
        if self.mbstd_group_size > 0:
            x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_channels)
        return self.out(self.fc(self.conv(x).flatten(start_dim=1))).squeeze(1)


def logistic_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic GAN loss of the discriminator: ``softplus(-D(real)) + softplus(D(fake))``, batch means summed."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def nonsaturating_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (Goodfellow et al. 2014): ``softplus(-D(fake))``, batch mean."""
    return F.softplus(-fake_logits.float()).mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 penalty (Mescheder et al. 2018): ``||grad_x D(x)||^2`` on real inputs, summed over each input's elements,
    batch mean; differentiable (``create_graph``). ``real_inputs`` must require gradients before the forward pass.
    Zero when the discriminator does not depend on its input."""
    (gradient,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True, allow_unused=True)
    if gradient is None:
        return real_logits.new_zeros((), dtype=torch.float32)
    return gradient.float().square().flatten(start_dim=1).sum(dim=1).mean()


def masks_to_one_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label maps ``[B, 1, H, W]`` (integer values, any dtype) or one-hot masks ``[B, num_classes, H, W]`` ->
    float one-hot ``[B, num_classes, H, W]``."""
    if masks.ndim != 4 or masks.shape[1] not in (1, num_classes):
        raise ValueError(
            f"masks must be [B, 1, H, W] label maps or [B, {num_classes}, H, W] one-hot, got {tuple(masks.shape)}."
        )
    if masks.shape[1] == num_classes and num_classes > 1:
        return masks.float()
    labels = masks.round().long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"label values must be in [0, {num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]."
        )
    return one_hot(labels, num_classes=num_classes, dtype=torch.float32)


class StyleGanTrainer(GanTrainerBase):
    """Train :class:`StyleGan2Generator` against :class:`StyleGan2Discriminator`: per iteration one discriminator
    step, then one generator step.

    Discriminator: ``logistic(D(real), D(softmax(G(z))))``, plus every ``r1_interval`` iterations the lazy R1 term
    ``r1_interval * r1_gamma / 2 * R1`` (StyleGAN2's lazy regularisation; its Adam settings then scale lr and betas
    by ``r1_interval / (r1_interval + 1)``, a config matter). Generator: ``nonsaturating(D(softmax(G(z))))`` with
    fresh ``z``; then the optional EMA copy is updated.

    Batch key ``mask_key``: label maps ``[B, 1, H, W]`` or one-hot masks ``[B, C, H, W]`` at the generator's
    resolution. The networks may be wrapped in ``DistributedDataParallel``. Mixed precision only on CUDA
    (:func:`~medgen_common.runtime.autocast_enabled`); R1 is always computed in float32.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers, amp: as MONAI's ``Trainer``.
        generator, discriminator, g_optimizer, d_optimizer: the networks and their optimisers (paper: AdamW 1e-4).
        r1_gamma: R1 weight (0 disables it).
        r1_interval: iterations between R1 terms (1: every iteration).
        ema_generator: ``torch.optim.swa_utils.AveragedModel`` of the generator (e.g. with
            ``multi_avg_fn=get_ema_multi_avg_fn(0.999)`` and ``use_buffers=True``), or None.
        mask_key: batch key of the real masks.
        grad_clip_norm: gradient-norm clip of both networks, or None.

    The iteration output holds ``loss`` (= ``generator``), ``discriminator``, ``r1`` (0 on iterations without
    it) and the mean logits ``real_score`` and ``fake_score``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        r1_gamma: float = 1.0,
        r1_interval: int = 16,
        ema_generator: torch.optim.swa_utils.AveragedModel | None = None,
        mask_key: str = "label",
        grad_clip_norm: float | None = None,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        nonfinite_loss: str = "raise",
    ):
        super().__init__(
            device, max_epochs, train_data_loader, (g_optimizer, d_optimizer), grad_clip_norm, epoch_length,
            train_handlers, amp, nonfinite_loss,
        )  # fmt: skip
        if r1_gamma < 0 or r1_interval < 1:
            raise ValueError(f"r1_gamma must be >= 0 and r1_interval >= 1, got {r1_gamma} and {r1_interval}.")
        self.generator, self.discriminator = generator, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.r1_gamma, self.r1_interval, self.ema_generator = r1_gamma, r1_interval, ema_generator
        self.mask_key = mask_key

    def _iteration(self, engine: StyleGanTrainer, batchdata: dict) -> dict:
        device = engine.state.device
        generator = _unwrap(self.generator)
        masks = batchdata[self.mask_key].to(device, non_blocking=engine.non_blocking)
        real = masks_to_one_hot(masks, generator.num_classes)
        if real.shape[2:] != (generator.resolution, generator.resolution):
            raise ValueError(f"masks must be {generator.resolution}x{generator.resolution}, got {tuple(real.shape)}.")
        regularise = self.r1_gamma > 0 and engine.state.iteration % self.r1_interval == 0
        self.generator.train()
        self.discriminator.train()

        self.d_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            with torch.no_grad():
                z = torch.randn(real.shape[0], generator.latent_dim, device=device)
                fake = torch.softmax(self.generator(z).float(), dim=1)
            fake_logits = self.discriminator(fake)
        real = real.detach().requires_grad_(regularise)  # never mark the loader's tensor
        with self.autocast(enabled=not regularise):  # R1 differentiates D(real) twice: keep it in float32
            real_logits = self.discriminator(real)
        discriminator_loss = logistic_discriminator_loss(real_logits, fake_logits)
        r1 = r1_penalty(real_logits, real) if regularise else real.new_zeros(())
        regularised_loss = discriminator_loss + self.r1_interval * self.r1_gamma / 2 * r1
        self.optimizer_step(regularised_loss, self.discriminator, self.d_optimizer, "discriminator")

        self.g_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            z = torch.randn(real.shape[0], generator.latent_dim, device=device)
            generated_logits = self.discriminator(torch.softmax(self.generator(z).float(), dim=1))
            generator_loss = nonsaturating_generator_loss(generated_logits)
        self.optimizer_step(generator_loss, self.generator, self.g_optimizer, "generator")
        if self.ema_generator is not None:
            self.ema_generator.update_parameters(generator)

        return {
            "loss": generator_loss.detach(),
            "generator": generator_loss.detach(),
            "discriminator": discriminator_loss.detach(),
            "r1": r1.detach(),
            "real_score": real_logits.detach().float().mean(),
            "fake_score": fake_logits.detach().float().mean(),
        }


def finding_filter(
    label_maps: torch.Tensor, finding_classes: int | Sequence[int], min_pixels: int = 1, min_component_pixels: int = 0
) -> torch.Tensor:
    """The paper's filter of generated masks "that lack significant pathologies" (§2.2.1): which masks to keep.

    Args:
        label_maps: ``[B, 1, H, W]`` or ``[B, H, W]`` integer label maps (e.g. the argmax of generator logits).
        finding_classes: the finding class (e.g. 4, DITF) or classes whose pixels count together.
        min_pixels: keep a mask only with at least this many finding pixels.
        min_component_pixels: and only when its largest connected finding region (4-connectivity) has at least this
            many pixels (0: no component check), so scattered stray pixels do not count as a finding.

    Returns:
        ``[B]`` bool, True for masks to keep.
    """
    classes = [finding_classes] if isinstance(finding_classes, int) else list(finding_classes)
    if not classes:
        raise ValueError("finding_classes must name at least one class.")
    labels = label_maps[:, 0] if label_maps.ndim == 4 else label_maps
    if labels.ndim != 3:
        raise ValueError(f"label maps must be [B, 1, H, W] or [B, H, W], got {tuple(label_maps.shape)}.")
    finding = torch.isin(labels, torch.tensor(classes, device=labels.device))
    keep = finding.flatten(start_dim=1).sum(dim=1) >= min_pixels
    if min_component_pixels > 0:
        for index in torch.nonzero(keep).flatten().tolist():
            components, count = ndimage.label(finding[index].cpu().numpy())
            largest = np.bincount(components.ravel())[1:].max() if count else 0
            keep[index] = bool(largest >= min_component_pixels)
    return keep


@torch.no_grad()
def sample_filtered_masks(
    generator: nn.Module,
    num_masks: int,
    finding_classes: int | Sequence[int],
    min_pixels: int = 1,
    min_component_pixels: int = 0,
    truncation_psi: float = 1.0,
    batch_size: int = 16,
    max_draws: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Draw masks from the generator until ``num_masks`` pass :func:`finding_filter`.

    Args:
        generator: :class:`StyleGan2Generator` (or its EMA ``AveragedModel`` / DDP wrapper); run in eval mode.
        num_masks: masks to return.
        finding_classes, min_pixels, min_component_pixels: see :func:`finding_filter`.
        truncation_psi: truncation of ``w`` (1: none).
        batch_size: masks drawn per forward pass.
        max_draws: give up after this many drawn masks (default ``20 * num_masks``, i.e. below 5 % acceptance).
        seed: seed of ``z`` and the noise inputs (the global random state is restored afterwards); None draws from
            the global state.

    Returns:
        Label maps ``[num_masks, 1, H, W]`` (int64, CPU) in drawing order.

    Raises:
        RuntimeError: fewer than ``num_masks`` masks passed within ``max_draws``.
    """
    network = _unwrap(generator)
    max_draws = 20 * num_masks if max_draws is None else max_draws
    device = next(network.parameters()).device
    was_training = generator.training
    generator.eval()
    kept, drawn = [], 0
    # a seed draws in a forked random state, so the caller's stream is untouched; without one the global stream moves on
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        while sum(len(masks) for masks in kept) < num_masks and drawn < max_draws:
            count = min(batch_size, max_draws - drawn)
            z = torch.randn(count, network.latent_dim, device=device)
            labels = generator(z, truncation_psi).argmax(dim=1, keepdim=True)
            kept.append(labels[finding_filter(labels, finding_classes, min_pixels, min_component_pixels)].cpu())
            drawn += count
    generator.train(was_training)
    passed = sum(len(masks) for masks in kept)
    if passed < num_masks:
        raise RuntimeError(
            f"only {passed} of {drawn} generated masks have >= {min_pixels} pixels of class(es) {finding_classes}"
            f"{f' in a region of >= {min_component_pixels} pixels' if min_component_pixels else ''}; {num_masks} were "
            "requested. Lower the threshold, raise max_draws, or train the mask generator longer."
        )
    return torch.cat(kept)[:num_masks]
