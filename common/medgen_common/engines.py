"""Training engines shared by the bundles, built on MONAI's ignite ``Trainer``.

- :class:`AutoencoderGanTrainer`: one step of a KL autoencoder with reconstruction, KL, perceptual and patch
  adversarial losses, then one discriminator step (the first stage of every latent diffusion bundle), optionally
  gated by an :class:`AdversarialReferee`.
- :class:`SpadeGanTrainer`: one step of a SPADE VAE-GAN image generator with every brainSPADE image-generator loss,
  then one multi-scale discriminator step.
- :class:`BiDiscriminatorPix2PixTrainer`: the V-EUS image-to-image GAN step: a global and a lesion-box
  conditional PatchGAN, then the generator with a colour-rebalanced L1 loss.
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
from monai.utils import convert_to_tensor
from torch import nn

from .elastography import ColourPrior, crop_boxes, lesion_boxes
from .guidance import CONTEXT, null_where
from .losses import (
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    kl_divergence,
    kl_divergence_logvar,
    style_consistency_loss,
)
from .runtime import autocast_dtype, autocast_enabled
from .transforms import probabilities_to_one_hot

__all__ = [
    "apply_output_activation",
    "AdversarialReferee",
    "GanTrainerBase",
    "skip_nonfinite_loss",
    "AutoencoderGanTrainer",
    "ReconstructionInferer",
    "LatentDiffusionPrepareBatch",
    "compute_latent_scale_factor",
    "fit_output_temperature",
    "SpadeGanTrainer",
    "BiDiscriminatorPix2PixTrainer",
]


def apply_output_activation(output: torch.Tensor, activation: str | None, temperature: float = 1.0) -> torch.Tensor:
    """``"softmax"`` over channels (dim 1; probabilistic label maps) or ``"sigmoid"`` of the logits
    ``output / temperature``, or None (identity)."""
    if activation == "softmax":
        return torch.softmax(output / temperature, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(output / temperature)
    if activation is None:
        return output
    raise ValueError(f"output activation must be None, 'softmax' or 'sigmoid', got '{activation}'.")


class AdversarialReferee:
    """Keeps generator and discriminator in balance from the discriminator's recent accuracy (the gate of the
    brainSPADE authors' 3D label autoencoder).

    Accuracy of one step = mean over real and fake patches of ``1 - |target - p|`` (target 1 for real, 0 for fake),
    averaged over the last ``n_steps`` steps, with ``p`` the discriminator's output read as a probability:
    ``"sigmoid"`` of logits (the authors' reading, meant for BCE or hinge discriminators) or ``"clamp"`` to [0, 1]
    (for least-squares discriminators, whose targets are 0 and 1 themselves; a sigmoid would squash a perfect one to
    0.62). The generator's adversarial term is used only while the accuracy is >= ``lower`` (the discriminator has
    something to teach), the discriminator is trained only while it is <= ``upper`` (it is not already winning).
    Before the first measurement both are trained.
    """

    def __init__(self, n_steps: int = 15, lower: float = 0.65, upper: float = 0.78, probability: str = "clamp"):
        if not 0.0 <= lower <= upper <= 1.0:
            raise ValueError(f"referee thresholds must satisfy 0 <= lower <= upper <= 1, got {lower}, {upper}.")
        if probability not in ("clamp", "sigmoid"):
            raise ValueError(f"referee probability must be 'clamp' or 'sigmoid', got '{probability}'.")
        self.n_steps, self.lower, self.upper, self.probability = n_steps, lower, upper, probability
        self.history: list[float] = []

    @property
    def accuracy(self) -> float | None:
        return sum(self.history) / len(self.history) if self.history else None

    def state_dict(self) -> dict:
        """The recent accuracies, so a resumed run gates as the interrupted one would have."""
        return {"history": torch.tensor(self.history, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(v) for v in state["history"]]

    @property
    def train_generator(self) -> bool:
        return self.accuracy is None or self.accuracy >= self.lower

    @property
    def train_discriminator(self) -> bool:
        return self.accuracy is None or self.accuracy <= self.upper

    def _as_probability(self, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().float()
        return torch.sigmoid(output) if self.probability == "sigmoid" else output.clamp(0.0, 1.0)

    def update(self, real_output: torch.Tensor, fake_output: torch.Tensor) -> float:
        """Record one step's accuracy from the discriminator's outputs on real and fake inputs; return it."""
        real = self._as_probability(real_output).mean()
        fake = 1.0 - self._as_probability(fake_output).mean()
        self.history = (self.history + [float(0.5 * (real + fake))])[-self.n_steps :]
        return self.history[-1]


def skip_nonfinite_loss(engine, loss: torch.Tensor, name: str, mode: str = "raise") -> bool:
    """Whether this step must be skipped because ``loss`` is NaN or infinite: ``mode="raise"`` stops training with
    a ``FloatingPointError`` naming the loss, the iteration and the epoch; ``"skip"`` counts the step in
    ``engine.state.skipped_nonfinite_steps``, logs it and returns True. False for a finite loss."""
    loss = loss.detach()
    if torch.isfinite(loss).all():
        return False
    message = (
        f"the {name} loss is {loss.float().mean().item()} at iteration {engine.state.iteration} "
        f"(epoch {engine.state.epoch})"
    )
    if mode == "raise":
        raise FloatingPointError(f"{message}; lower the learning rate or check the inputs for NaN/Inf.")
    engine.state.skipped_nonfinite_steps += 1  # set to 0 by the GAN trainers and NonFiniteLossGuard
    engine.logger.warning(f"{message}: step skipped ({engine.state.skipped_nonfinite_steps} so far).")
    return True


class GanTrainerBase(Trainer):
    """What every adversarial trainer here shares: MONAI's ``Trainer`` (no decollation) with mixed precision only
    where the device supports it (:func:`~medgen_common.runtime.autocast_enabled`), one gradient scaler per
    optimiser (active for float16 on CUDA), and :meth:`optimizer_step`: a scaled, optionally norm-clipped update
    that refuses a non-finite loss. Subclasses implement ``_iteration``.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers, amp: as MONAI's ``Trainer``.
        optimizers: every optimiser the subclass steps.
        grad_clip_norm: gradient-norm clip applied in every step, or None.
        nonfinite_loss: ``"raise"`` (stop on a NaN/Inf loss) or ``"skip"`` (drop that update, count it).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        optimizers: Sequence[torch.optim.Optimizer],
        grad_clip_norm: float | None = None,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        nonfinite_loss: str = "raise",
    ):
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}.")
        amp = autocast_enabled(device, amp)
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=train_data_loader, epoch_length=epoch_length,
            handlers=train_handlers, amp=amp, amp_kwargs={"dtype": autocast_dtype(device)} if amp else None,
            decollate=False,
        )  # fmt: skip
        use_scaler = amp and autocast_dtype(device) == torch.float16
        self.grad_clip_norm, self.nonfinite_loss = grad_clip_norm, nonfinite_loss
        self.state.skipped_nonfinite_steps = 0
        self.scalers = {optimizer: torch.amp.GradScaler("cuda", enabled=use_scaler) for optimizer in optimizers}

    def autocast(self, enabled: bool = True) -> torch.autocast:
        """Autocast context of this trainer's device and dtype (a no-op without AMP or with ``enabled=False``)."""
        device_type = torch.device(self.state.device).type
        return torch.autocast(device_type, enabled=self.amp and enabled, **(self.amp_kwargs or {}))

    def optimizer_step(
        self, loss: torch.Tensor, network: nn.Module, optimizer: torch.optim.Optimizer, name: str
    ) -> None:
        """Back-propagate ``loss`` and step ``optimizer`` through its scaler, clipping ``network``'s gradients.

        A NaN or infinite ``loss`` stops training (``nonfinite_loss="raise"``) or skips this update, counted in
        ``state.skipped_nonfinite_steps`` and logged (``"skip"``).

        Raises:
            FloatingPointError: ``loss`` is NaN or infinite; the message names the loss and the iteration.
        """
        if skip_nonfinite_loss(self, loss, name, self.nonfinite_loss):
            optimizer.zero_grad(set_to_none=True)
            return
        scaler = self.scalers[optimizer]
        scaler.scale(loss).backward()
        if self.grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()


class AutoencoderGanTrainer(GanTrainerBase):
    """Train an ``AutoencoderKL`` with a ``PatchDiscriminator``.

    Generator loss: ``reconstruction(recon, x) + kl_weight * KL + perceptual_weight * P(act(recon), x)
    + adversarial_weight * LSGAN(D(act(recon)), 1)``; discriminator loss: ``adversarial_weight * 0.5 *
    (LSGAN(D(act(recon)), 0) + LSGAN(D(x), 1))`` (brainSPADE chapter Eq. 1.1). ``act`` is ``output_activation``
    (softmax over channels for probabilistic label maps, identity for images); the reconstruction loss sees the
    raw decoder output. Gradients are clipped to ``grad_clip_norm``. The adversarial terms start after
    ``adversarial_warmup_iterations``; with a ``referee`` they are then switched on and off by the discriminator's
    recent accuracy (:class:`AdversarialReferee`).

    The iteration output holds every loss term (``loss``, ``reconstruction``, ``kl``, ``perceptual``,
    ``adversarial``, ``discriminator``) for logging, and with a referee its ``discriminator_accuracy`` (0 before
    the adversarial phase).

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers, amp: as MONAI's ``Trainer``.
        autoencoder: ``AutoencoderKL``; ``forward(x)`` returns ``(reconstruction, z_mu, z_sigma)``.
        discriminator: ``PatchDiscriminator``; its last output is the logits map.
        g_optimizer, d_optimizer: optimisers of the two networks.
        reconstruction_loss: ``f(reconstruction, target) -> scalar``.
        perceptual_loss: ``f(prediction, target) -> scalar`` or None.
        image_key: batch key of the training images ``[B, C, *spatial]``.
        referee: optional :class:`AdversarialReferee` gating the two adversarial updates.
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
        referee: AdversarialReferee | None = None,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        nonfinite_loss: str = "raise",
    ):
        super().__init__(
            device, max_epochs, train_data_loader, (g_optimizer, d_optimizer), grad_clip_norm, epoch_length,
            train_handlers, amp, nonfinite_loss,
        )  # fmt: skip
        apply_output_activation(torch.zeros(1, 1), output_activation)  # validates the name early
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.reconstruction_loss = reconstruction_loss
        self.perceptual_loss = perceptual_loss
        self.kl_weight, self.perceptual_weight, self.adversarial_weight = (
            kl_weight,
            perceptual_weight,
            adversarial_weight,
        )
        self.adversarial_warmup_iterations, self.referee = adversarial_warmup_iterations, referee
        self.output_activation, self.image_key = output_activation, image_key
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")

    def _iteration(self, engine: AutoencoderGanTrainer, batchdata: dict) -> dict:
        images = batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking).float()
        use_adversarial = self.adversarial_weight > 0 and engine.state.iteration > self.adversarial_warmup_iterations
        autocast = self.autocast()

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
            train_generator_adversarially = use_adversarial and (self.referee is None or self.referee.train_generator)
            generator_adversarial = (
                self.adversarial_loss(self.discriminator(activated)[-1], target_is_real=True, for_discriminator=False)
                if train_generator_adversarially
                else images.new_zeros(())
            )
            generator_loss = (
                reconstruction_loss
                + self.kl_weight * kl
                + self.perceptual_weight * perceptual
                + self.adversarial_weight * generator_adversarial
            )
        self.optimizer_step(generator_loss, self.autoencoder, self.g_optimizer, "generator")

        discriminator_loss = images.new_zeros(())
        if use_adversarial:
            train_discriminator = self.referee is None or self.referee.train_discriminator
            self.discriminator.train()
            self.d_optimizer.zero_grad(set_to_none=True)
            with autocast, torch.set_grad_enabled(train_discriminator):
                fake_logits = self.discriminator(activated.detach())[-1]
                real_logits = self.discriminator(images)[-1]
                fake = self.adversarial_loss(fake_logits, target_is_real=False, for_discriminator=True)
                real = self.adversarial_loss(real_logits, target_is_real=True, for_discriminator=True)
                discriminator_loss = self.adversarial_weight * 0.5 * (fake + real)
            if train_discriminator:
                self.optimizer_step(discriminator_loss, self.discriminator, self.d_optimizer, "discriminator")
            if self.referee is not None:
                self.referee.update(real_logits, fake_logits)

        output = {
            "loss": generator_loss.detach(),
            "reconstruction": reconstruction_loss.detach(),
            "kl": kl.detach(),
            "perceptual": perceptual.detach(),
            "adversarial": generator_adversarial.detach(),
            "discriminator": discriminator_loss.detach(),
        }
        if self.referee is not None:
            output["discriminator_accuracy"] = torch.tensor(self.referee.accuracy or 0.0)
        return output


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


@torch.no_grad()
def fit_output_temperature(
    autoencoder: nn.Module, data_loader, device, image_key: str = "image", max_batches: int = 8
) -> float:
    """Softmax temperature ``T`` of the autoencoder's decoded logits that minimises the cross-entropy against the
    soft (partial-volume) training maps ``[B, C, *spatial]`` (temperature scaling, Guo et al. 2017).

    A focal reconstruction loss is not a proper scoring rule: it leaves the softmax under-confident, which inflates
    the soft volume of classes that sit at boundaries (CSF). Dividing the logits by ``T`` (< 1 sharpens) restores
    calibrated probabilities without changing the argmax. The cross-entropy is convex in ``1 / T``; a golden-section
    search over ``log T`` in [-3, 3] finds it. Uses the first ``max_batches`` batches, averaged over DDP ranks.
    """
    autoencoder.eval()
    logits, targets = [], []
    for index, batch in enumerate(data_loader):
        if index >= max_batches:
            break
        target = batch[image_key].to(device).float()
        logits.append(autoencoder.reconstruct(target).float())
        targets.append(target)
    if not logits:
        raise ValueError("cannot fit an output temperature: the data loader is empty.")
    logits, targets = torch.cat(logits), torch.cat(targets)

    def cross_entropy(log_temperature: float) -> float:
        log_probs = torch.log_softmax(logits / math.exp(log_temperature), dim=1)
        return float(-(targets * log_probs).sum(1).mean())

    low, high = -3.0, 3.0
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if cross_entropy(a) < cross_entropy(b):
            high = b
        else:
            low = a
    temperature = torch.tensor(math.exp((low + high) / 2), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(temperature)
        temperature = temperature / torch.distributed.get_world_size()
    return float(temperature)


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Prepare a diffusion training batch in the latent space of a frozen autoencoder.

    Encodes ``batch[image_key]`` (``[B, C, *spatial]``) with ``autoencoder.encode_stage_2_inputs`` (a sample of the
    posterior, as the brainSPADE repos do), multiplies by ``scale_factor``, zero-pads to ``ldm_latent_shape`` when
    given, and returns ``(latents, noise, (), {"noise", "timesteps", "condition"})`` for ``SupervisedTrainer`` with a
    ``DiffusionInferer`` (target = noise: epsilon prediction).

    Condition dropout for classifier-free guidance: each sample's ``batch[condition_name]`` is replaced by
    the cross-attention null (``guidance.NULL_CONTEXT_VALUE``, -1, as MONAI's ``cfg`` sampling) with probability
    ``condition_dropout``.
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
        latents = convert_to_tensor(latents, track_meta=False)  # a MetaTensor would slow every network op
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        infer_kwargs = {"noise": noise, "timesteps": timesteps}
        if self.condition_name is not None:
            condition = batchdata[self.condition_name].to(device, non_blocking=non_blocking).float()
            if self.condition_dropout > 0:
                dropped = torch.rand(condition.shape[0], device=condition.device) < self.condition_dropout
                condition = null_where(condition, dropped, CONTEXT)
            infer_kwargs["condition"] = condition
        return latents, noise, (), infer_kwargs


class SpadeGanTrainer(GanTrainerBase):
    """Train a SPADE VAE-GAN image generator (:class:`~medgen_common.networks.StyleSpadeGenerator`) against a
    ``MultiScalePatchDiscriminator`` with every loss of the brainSPADE chapter (Eqs. 1.4-1.7):

    ``L_G = hinge_G + feature_weight * L_feat + kld_weight * L_KLD + perceptual_weight * L_perc
    + consistency_weight * L_cont + contrast_weight * CE(C(fake), contrast) + dataset_weight * CE(C(fake), dataset)
    + reconstruction_weight * mean|fake - image|``

    (the last term is not in the chapter; its weight is 0 there), then one discriminator step
    ``hinge_D(D(real), D(fake))``. The discriminator sees ``one_hot(argmax(label))`` concatenated with the image (a
    hard label, as the SPADE repositories), the generator the soft label map.
    ``L_cont = 1 - cos(mu(style), mu(augment(style)))`` (slice consistency under a random affine of the style).
    The contrast classifier ``C`` (2D slices) is frozen; in 3D it is not used (weights 0, as the chapter).

    Batch keys: ``label`` ``[B, C, *spatial]`` soft label, ``image`` ``[B, 1, *spatial]``, ``style``
    ``[B, 1, H, W]`` a different slice of the same subject and contrast, ``contrast`` ``[B]`` contrast index, and
    ``dataset`` ``[B]`` when ``dataset_weight > 0``.

    Args:
        generator, discriminator, g_optimizer, d_optimizer: networks and their (TTUR) optimisers.
        perceptual_loss: ``f(fake, real) -> scalar`` or None.
        style_augmentation: per-sample callable ``[1, H, W] -> [1, H, W]`` (e.g. MONAI ``RandAffine``), needed when
            ``consistency_weight > 0``.
        classifier: frozen :class:`~medgen_common.networks.ContrastClassifier`, needed when ``contrast_weight`` or
            ``dataset_weight`` > 0.
        reconstruction_weight: weight of the L1 distance to the label's own image (a pix2pix-style term that speeds
            up short trainings; 0 in the chapter).
        grad_clip_norm: gradient-norm clip of both networks, or None.
        device, max_epochs, train_data_loader, epoch_length, train_handlers, amp: as MONAI's ``Trainer``.

    The iteration output holds ``loss`` (generator total) and each term for logging.
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
        feature_weight: float = 10.0,
        kld_weight: float = 0.05,
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        style_augmentation: Callable | None = None,
        consistency_weight: float = 0.0,
        classifier: nn.Module | None = None,
        contrast_weight: float = 0.0,
        dataset_weight: float = 0.0,
        reconstruction_weight: float = 0.0,
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
        if reconstruction_weight < 0:
            raise ValueError(f"reconstruction_weight must be >= 0, got {reconstruction_weight}.")
        if consistency_weight > 0 and style_augmentation is None:
            raise ValueError("consistency_weight > 0 needs a style_augmentation (e.g. monai.transforms.RandAffine).")
        if (contrast_weight > 0 or dataset_weight > 0) and classifier is None:
            raise ValueError("contrast_weight or dataset_weight > 0 needs a trained contrast classifier.")
        self.generator, self.discriminator = generator, discriminator
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.feature_weight, self.kld_weight = feature_weight, kld_weight
        self.perceptual_loss, self.perceptual_weight = perceptual_loss, perceptual_weight
        self.style_augmentation, self.consistency_weight = style_augmentation, consistency_weight
        self.classifier, self.contrast_weight, self.dataset_weight = classifier, contrast_weight, dataset_weight
        self.reconstruction_weight = reconstruction_weight
        if classifier is not None:
            classifier.requires_grad_(False)

    def _classifier_losses(self, fake: torch.Tensor, batchdata: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of the frozen classifier's contrast and dataset predictions on the generated images."""
        zero = fake.new_zeros(())
        if self.classifier is None or (self.contrast_weight <= 0 and self.dataset_weight <= 0):
            return zero, zero
        self.classifier.eval()
        contrast_logits, dataset_logits = self.classifier.split(self.classifier(fake))
        contrast = torch.nn.functional.cross_entropy(contrast_logits, batchdata["contrast"].to(device).long())
        dataset = (
            torch.nn.functional.cross_entropy(dataset_logits, batchdata["dataset"].to(device).long())
            if self.dataset_weight > 0 and dataset_logits.shape[1] > 0
            else zero
        )
        return contrast, dataset

    def _iteration(self, engine: SpadeGanTrainer, batchdata: dict) -> dict:
        device = engine.state.device
        labels = batchdata["label"].to(device, non_blocking=engine.non_blocking).float()
        images = batchdata["image"].to(device, non_blocking=engine.non_blocking).float()
        styles = batchdata["style"].to(device, non_blocking=engine.non_blocking).float()
        hard_labels = probabilities_to_one_hot(labels, dim=1)
        autocast = self.autocast()
        zero = images.new_zeros(())

        self.generator.train()
        self.discriminator.train()
        self.g_optimizer.zero_grad(set_to_none=True)
        with autocast:
            fake, mu, logvar = self.generator(labels, styles)
            fake_logits, fake_features = self.discriminator(torch.cat([hard_labels, fake], 1))
            with torch.no_grad():
                _, real_features = self.discriminator(torch.cat([hard_labels, images], 1))
            adversarial = hinge_generator_loss(fake_logits)
            features = feature_matching_loss(fake_features, real_features)
            kld = kl_divergence_logvar(mu.float(), logvar.float())
            perceptual = (
                self.perceptual_loss(fake.float(), images)
                if self.perceptual_loss is not None and self.perceptual_weight > 0
                else zero
            )
            consistency = zero
            if self.consistency_weight > 0:
                augmented = torch.stack(
                    [convert_to_tensor(self.style_augmentation(style), track_meta=False) for style in styles]
                )
                encoder = getattr(self.generator, "module", self.generator)  # the network inside a DDP wrapper
                consistency = style_consistency_loss(mu, encoder.encode(augmented.to(device))[0])
            contrast, dataset = self._classifier_losses(fake, batchdata, device)
            reconstruction = (fake.float() - images).abs().mean()
            generator_loss = (
                adversarial + self.feature_weight * features + self.kld_weight * kld
                + self.perceptual_weight * perceptual + self.consistency_weight * consistency
                + self.contrast_weight * contrast + self.dataset_weight * dataset
                + self.reconstruction_weight * reconstruction
            )  # fmt: skip
        self.optimizer_step(generator_loss, self.generator, self.g_optimizer, "generator")

        self.d_optimizer.zero_grad(set_to_none=True)
        with autocast:
            real_logits, _ = self.discriminator(torch.cat([hard_labels, images], 1))
            fake_logits, _ = self.discriminator(torch.cat([hard_labels, fake.detach()], 1))
            discriminator_loss = hinge_discriminator_loss(real_logits, fake_logits)
        self.optimizer_step(discriminator_loss, self.discriminator, self.d_optimizer, "discriminator")

        return {
            "loss": generator_loss.detach(),
            "adversarial": adversarial.detach(),
            "feature_matching": features.detach(),
            "kld": kld.detach(),
            "perceptual": perceptual.detach(),
            "consistency": consistency.detach(),
            "contrast": contrast.detach(),
            "dataset": dataset.detach(),
            "reconstruction": reconstruction.detach(),
            "discriminator": discriminator_loss.detach(),
        }


class BiDiscriminatorPix2PixTrainer(GanTrainerBase):
    """Train the V-EUS generator (B-mode -> RGB elastogram, chapter 8) against two conditional PatchGANs.

    Per iteration (the authors' order): the global discriminator on (B-mode, elastogram) pairs, then the tumour
    discriminator on the same pairs cropped to a square box around the lesion and resized to ``crop_size``
    (:func:`~medgen_common.elastography.lesion_boxes`), then the generator with the discriminators frozen:

    ``L_G = l1_weight * mean(gamma(y) |y - G(x)|) + BCE(D_g(x, G(x)), 1) + BCE(D_t(x_t, G(x)_t), 1)``   (Eq. 8.2,
    the terms added as the authors' code does); ``L_D = 0.5 (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0))`` for each
    discriminator (Eqs. 8.3-8.4). ``gamma`` is the colour-rebalancing prior of the *real* pixel's colour
    (:class:`~medgen_common.elastography.ColourPrior`, Eq. 8.1), 1 without a prior.

    Batch keys: ``bmode`` ``[B, 1, H, W]`` and ``elastogram`` ``[B, 3, H, W]``, both in [-1, 1], and ``mask``
    ``[B, 1, H, W]`` (the lesion, needed with a tumour discriminator).

    Args:
        generator: image-to-image network with Tanh output.
        global_discriminator, tumour_discriminator: MONAI ``PatchDiscriminator`` (4 input channels); the last
            output is the logits map. ``tumour_discriminator=None`` trains without it (the ablation).
        g_optimizer, global_optimizer, tumour_optimizer: their optimisers (``tumour_optimizer`` None with it).
        colour_prior: gamma table, or None for plain L1 (the ablation).
        l1_weight: lambda of Eq. 8.2 (100).
        box_margin, min_box_size, crop_size: the tumour box (fraction of the lesion's side, pixels, pixels).
        device, max_epochs, train_data_loader, epoch_length, train_handlers, amp, grad_clip_norm: as
            :class:`GanTrainerBase`.

    The iteration output holds ``loss`` (generator total), ``l1`` (weighted, before ``l1_weight``),
    ``adversarial_global``, ``adversarial_tumour``, ``discriminator_global`` and ``discriminator_tumour``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        generator: nn.Module,
        global_discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        global_optimizer: torch.optim.Optimizer,
        tumour_discriminator: nn.Module | None = None,
        tumour_optimizer: torch.optim.Optimizer | None = None,
        colour_prior: ColourPrior | None = None,
        l1_weight: float = 100.0,
        box_margin: float = 0.25,
        min_box_size: int = 32,
        crop_size: int = 64,
        grad_clip_norm: float | None = None,
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        nonfinite_loss: str = "raise",
    ):
        if (tumour_discriminator is None) != (tumour_optimizer is None):
            raise ValueError("give tumour_discriminator and tumour_optimizer together, or neither.")
        optimizers = [o for o in (g_optimizer, global_optimizer, tumour_optimizer) if o is not None]
        super().__init__(
            device,
            max_epochs,
            train_data_loader,
            optimizers,
            grad_clip_norm,
            epoch_length,
            train_handlers,
            amp,
            nonfinite_loss,
        )
        self.generator, self.global_discriminator, self.tumour_discriminator = (
            generator, global_discriminator, tumour_discriminator
        )  # fmt: skip
        self.g_optimizer, self.global_optimizer, self.tumour_optimizer = g_optimizer, global_optimizer, tumour_optimizer
        self.colour_prior, self.l1_weight = colour_prior, l1_weight
        self.box_margin, self.min_box_size, self.crop_size = box_margin, min_box_size, crop_size
        self.adversarial_loss = PatchAdversarialLoss(criterion="bce")

    def _discriminator_step(self, discriminator, optimizer, real_pair, fake_pair, name: str) -> torch.Tensor:
        discriminator.requires_grad_(True)  # frozen by the previous generator step
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            real = self.adversarial_loss(
                discriminator(real_pair)[-1].float(), target_is_real=True, for_discriminator=True
            )
            fake = self.adversarial_loss(
                discriminator(fake_pair)[-1].float(), target_is_real=False, for_discriminator=True
            )
            loss = 0.5 * (real + fake)
        self.optimizer_step(loss, discriminator, optimizer, name)
        return loss.detach()

    def _generator_adversarial(self, discriminator, fake_pair) -> torch.Tensor:
        # the network inside a DDP wrapper: its frozen parameters get no gradients to reduce in the generator step
        discriminator = getattr(discriminator, "module", discriminator).requires_grad_(False)
        return self.adversarial_loss(discriminator(fake_pair)[-1].float(), target_is_real=True, for_discriminator=False)

    def _iteration(self, engine: BiDiscriminatorPix2PixTrainer, batchdata: dict) -> dict:
        device = engine.state.device
        bmode = batchdata["bmode"].to(device, non_blocking=engine.non_blocking).float()
        real = batchdata["elastogram"].to(device, non_blocking=engine.non_blocking).float()
        zero = real.new_zeros(())
        self.generator.train()
        self.global_discriminator.train()
        with self.autocast():
            fake = self.generator(bmode).float()

        global_loss = self._discriminator_step(
            self.global_discriminator, self.global_optimizer, torch.cat([bmode, real], 1),
            torch.cat([bmode, fake.detach()], 1), "global discriminator",
        )  # fmt: skip
        tumour_loss = zero
        if self.tumour_discriminator is not None:
            boxes = lesion_boxes(batchdata["mask"].to(device), self.box_margin, self.min_box_size)
            bmode_crop, real_crop = crop_boxes(bmode, boxes, self.crop_size), crop_boxes(real, boxes, self.crop_size)
            self.tumour_discriminator.train()
            tumour_loss = self._discriminator_step(
                self.tumour_discriminator, self.tumour_optimizer, torch.cat([bmode_crop, real_crop], 1),
                torch.cat([bmode_crop, crop_boxes(fake.detach(), boxes, self.crop_size)], 1), "tumour discriminator",
            )  # fmt: skip

        self.g_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            weights = self.colour_prior.pixel_weights((real + 1.0) / 2.0) if self.colour_prior is not None else 1.0
            l1 = (weights * (real - fake).abs()).mean()
            adversarial_global = self._generator_adversarial(self.global_discriminator, torch.cat([bmode, fake], 1))
            adversarial_tumour = zero
            if self.tumour_discriminator is not None:
                fake_crop = crop_boxes(fake, boxes, self.crop_size)
                adversarial_tumour = self._generator_adversarial(
                    self.tumour_discriminator, torch.cat([bmode_crop, fake_crop], 1)
                )
            generator_loss = self.l1_weight * l1 + adversarial_global + adversarial_tumour
        self.optimizer_step(generator_loss, self.generator, self.g_optimizer, "generator")
        return {
            "loss": generator_loss.detach(),
            "l1": l1.detach(),
            "adversarial_global": adversarial_global.detach(),
            "adversarial_tumour": adversarial_tumour.detach(),
            "discriminator_global": global_loss,
            "discriminator_tumour": tumour_loss,
        }
