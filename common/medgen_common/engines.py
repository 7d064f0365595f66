"""Training engines shared by the bundles, built on MONAI's ignite ``Trainer``.

- :class:`AutoencoderGanTrainer`: one step of a KL autoencoder with reconstruction, KL, perceptual and patch
  adversarial losses, then one discriminator step (the first stage of every latent diffusion bundle).
- :class:`LatentDiffusionPrepareBatch`: turns a batch of images into (noisy-latent target, kwargs) for MONAI's
  ``SupervisedTrainer`` + ``DiffusionInferer``, encoding with a frozen autoencoder and dropping conditions at
  random for classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.engines import DiffusionPrepareBatch, Trainer
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss
from monai.transforms import SpatialPad
from torch import nn

from .losses import kl_divergence
from .runtime import autocast_dtype, autocast_enabled

__all__ = [
    "apply_output_activation",
    "AutoencoderGanTrainer",
    "ReconstructionInferer",
    "LatentDiffusionPrepareBatch",
    "compute_latent_scale_factor",
    "NULL_CONDITION_VALUE",
]

# value filling a dropped (null) condition; MONAI's LatentDiffusionInferer.sample(cfg=...) uses the same default
NULL_CONDITION_VALUE = -1.0


def apply_output_activation(output: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``"softmax"`` over channels (dim 1; probabilistic label maps), ``"sigmoid"``, or None (identity)."""
    if activation == "softmax":
        return torch.softmax(output, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(output)
    if activation is None:
        return output
    raise ValueError(f"output activation must be None, 'softmax' or 'sigmoid', got '{activation}'.")


class AutoencoderGanTrainer(Trainer):
    """Train an ``AutoencoderKL`` with a ``PatchDiscriminator``.

    Generator loss: ``reconstruction(recon, x) + kl_weight * KL + perceptual_weight * P(act(recon), x)
    + adversarial_weight * LSGAN(D(act(recon)), 1)``; discriminator loss: ``adversarial_weight * 0.5 *
    (LSGAN(D(act(recon)), 0) + LSGAN(D(x), 1))`` (brainSPADE chapter Eq. 1.1). ``act`` is ``output_activation``
    (softmax over channels for probabilistic label maps, identity for images); the reconstruction loss sees the
    raw decoder output. Gradients are clipped to ``grad_clip_norm``. The adversarial terms start after
    ``adversarial_warmup_iterations``.

    The iteration output holds every loss term (``loss``, ``reconstruction``, ``kl``, ``perceptual``,
    ``adversarial``, ``discriminator``) for logging.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers, amp: as MONAI's ``Trainer``.
        autoencoder: ``AutoencoderKL``; ``forward(x)`` returns ``(reconstruction, z_mu, z_sigma)``.
        discriminator: ``PatchDiscriminator``; its last output is the logits map.
        g_optimizer, d_optimizer: optimisers of the two networks.
        reconstruction_loss: ``f(reconstruction, target) -> scalar``.
        perceptual_loss: ``f(prediction, target) -> scalar`` or None.
        image_key: batch key of the training images ``[B, C, *spatial]``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        autoencoder: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        reconstruction_loss: Callable,
        kl_weight: float = 1e-6,
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        adversarial_weight: float = 0.01,
        adversarial_warmup_iterations: int = 0,
        output_activation: str | None = None,
        grad_clip_norm: float | None = 1.0,
        image_key: str = "image",
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
    ):
        amp = autocast_enabled(device, amp)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            amp=amp,
            amp_kwargs={"dtype": autocast_dtype(device)} if amp else None,
            decollate=False,
        )
        apply_output_activation(torch.zeros(1, 1), output_activation)  # validates the name early
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.reconstruction_loss = reconstruction_loss
        self.perceptual_loss = perceptual_loss
        self.kl_weight, self.perceptual_weight, self.adversarial_weight = kl_weight, perceptual_weight, adversarial_weight
        self.adversarial_warmup_iterations = adversarial_warmup_iterations
        self.output_activation, self.grad_clip_norm, self.image_key = output_activation, grad_clip_norm, image_key
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
        use_scaler = amp and autocast_dtype(device) == torch.float16
        self.g_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    def _step(self, loss: torch.Tensor, network: nn.Module, optimizer, scaler) -> None:
        scaler.scale(loss).backward()
        if self.grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()

    def _iteration(self, engine: AutoencoderGanTrainer, batchdata: dict) -> dict:
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking).float()
        use_adversarial = self.adversarial_weight > 0 and engine.state.iteration > self.adversarial_warmup_iterations
        autocast = torch.autocast(torch.device(engine.state.device).type, enabled=engine.amp, **(engine.amp_kwargs or {}))

        self.autoencoder.train()
        self.g_optimizer.zero_grad(set_to_none=True)
        with autocast:
            reconstruction, z_mu, z_sigma = self.autoencoder(images)
            reconstruction_loss = self.reconstruction_loss(reconstruction.float(), images)
            kl = kl_divergence(z_mu.float(), z_sigma.float())
            activated = apply_output_activation(reconstruction.float(), self.output_activation)
            perceptual = (
                self.perceptual_loss(activated, images)
                if self.perceptual_loss is not None and self.perceptual_weight > 0
                else images.new_zeros(())
            )
            generator_adversarial = (
                self.adversarial_loss(self.discriminator(activated)[-1], target_is_real=True, for_discriminator=False)
                if use_adversarial
                else images.new_zeros(())
            )
            generator_loss = (
                reconstruction_loss
                + self.kl_weight * kl
                + self.perceptual_weight * perceptual
                + self.adversarial_weight * generator_adversarial
            )
        self._step(generator_loss, self.autoencoder, self.g_optimizer, self.g_scaler)

        discriminator_loss = images.new_zeros(())
        if use_adversarial:
            self.discriminator.train()
            self.d_optimizer.zero_grad(set_to_none=True)
            with autocast:
                fake = self.adversarial_loss(
                    self.discriminator(activated.detach())[-1], target_is_real=False, for_discriminator=True
                )
                real = self.adversarial_loss(self.discriminator(images)[-1], target_is_real=True, for_discriminator=True)
                discriminator_loss = self.adversarial_weight * 0.5 * (fake + real)
            self._step(discriminator_loss, self.discriminator, self.d_optimizer, self.d_scaler)

        return {
            "loss": generator_loss.detach(),
            "reconstruction": reconstruction_loss.detach(),
            "kl": kl.detach(),
            "perceptual": perceptual.detach(),
            "adversarial": generator_adversarial.detach(),
            "discriminator": discriminator_loss.detach(),
        }


class ReconstructionInferer(Inferer):
    """Inferer for validating an autoencoder: ``network.reconstruct(x)`` followed by ``output_activation``
    (``"softmax"`` over channels for probabilistic label maps, ``"sigmoid"``, or None)."""

    def __init__(self, output_activation: str | None = None):
        super().__init__()
        self.output_activation = output_activation

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        return apply_output_activation(network.reconstruct(inputs), self.output_activation)


@torch.no_grad()
def compute_latent_scale_factor(autoencoder: nn.Module, data_loader, device, image_key: str = "image") -> float:
    """``1 / std`` of the autoencoder latents of the first batch (Rombach et al. 2022), so the diffusion model sees
    latents of unit variance."""
    autoencoder.eval()
    batch = next(iter(data_loader))
    latents = autoencoder.encode_stage_2_inputs(batch[image_key].to(device).float())
    variance = latents.float().var()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank must train with the same scale: average the first-batch variance over ranks
        torch.distributed.all_reduce(variance)
        variance = variance / torch.distributed.get_world_size()
    std = float(variance.sqrt())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent standard deviation is {std}: is the autoencoder trained and the data non-empty?")
    return 1.0 / std


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Prepare a diffusion training batch in the latent space of a frozen autoencoder.

    Encodes ``batch[image_key]`` (``[B, C, *spatial]``) with ``autoencoder.encode_stage_2_inputs`` (a sample of the
    posterior, as the brainSPADE repos do), multiplies by ``scale_factor``, zero-pads to ``ldm_latent_shape`` when
    given, and returns ``(latents, noise, (), {"noise", "timesteps", "condition"})`` for ``SupervisedTrainer`` with a
    ``DiffusionInferer`` (target = noise: epsilon prediction).

    Condition dropout for classifier-free guidance: each sample's ``batch[condition_name]`` is replaced by
    ``NULL_CONDITION_VALUE`` with probability ``condition_dropout``.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        autoencoder: nn.Module,
        scale_factor: float = 1.0,
        condition_name: str | None = None,
        condition_dropout: float = 0.0,
        image_key: str = "image",
        ldm_latent_shape: Sequence[int] | None = None,
    ):
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}.")
        self.autoencoder, self.scale_factor = autoencoder, float(scale_factor)
        self.condition_dropout, self.image_key = condition_dropout, image_key
        self.pad = SpatialPad(spatial_size=list(ldm_latent_shape)) if ldm_latent_shape is not None else None

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        images = batchdata[self.image_key].to(device, non_blocking=non_blocking).float()
        self.autoencoder.eval()
        with torch.no_grad():
            latents = self.autoencoder.encode_stage_2_inputs(images) * self.scale_factor
        if self.pad is not None:
            latents = torch.stack([self.pad(latent) for latent in latents])
        latents = torch.as_tensor(latents)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        infer_kwargs = {"noise": noise, "timesteps": timesteps}
        if self.condition_name is not None:
            condition = batchdata[self.condition_name].to(device, non_blocking=non_blocking).float()
            if self.condition_dropout > 0:
                dropped = torch.rand(condition.shape[0], device=condition.device) < self.condition_dropout
                condition = torch.where(
                    dropped.view(-1, *([1] * (condition.ndim - 1))), torch.full_like(condition, NULL_CONDITION_VALUE), condition
                )
            infer_kwargs["condition"] = condition
        return latents, noise, (), infer_kwargs
