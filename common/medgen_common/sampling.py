"""Sampling from latent diffusion bundles inside MONAI's ``SupervisedEvaluator``.

The inference "dataset" is a list of sample specifications (a seed and, optionally, a condition), so each output is
reproducible on its own: the same seed and condition give the same sample whatever the batch it falls in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from .engines import apply_output_activation
from .karras import SOLVERS, KarrasScheduler
from .runtime import autocast_dtype, autocast_enabled

__all__ = [
    "StochasticDDIMScheduler",
    "TrainingGridDDPMScheduler",
    "named_batch",
    "step_noise_seed",
    "make_scheduler",
    "make_sample_specs",
    "SeededNoisePrepareBatch",
    "LatentDiffusionSampler",
]


SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler"}


class TrainingGridDDPMScheduler(DDPMScheduler):
    """MONAI's DDPM sampler, refused off the training grid. Its ``step`` uses the one-step ``beta_t`` and ``alpha_t``
    (DDPM Eq. 7), right only when consecutive timesteps are 1 apart; with fewer inference steps the posterior mean and
    variance are wrong (the demo label model's WM fraction fell from 0.30 to 0.10 at 50 steps). DDIM with eta 1 is the
    same ancestral sampler on a coarser grid."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if num_inference_steps != self.num_train_timesteps:
            raise ValueError(
                f"'ddpm' samples only on the {self.num_train_timesteps}-step training grid (MONAI's DDPM step is "
                f"wrong when steps are skipped), got {num_inference_steps} steps; use 'ddim' with eta 1 for the same "
                "stochastic sampler with fewer steps."
            )
        super().set_timesteps(num_inference_steps, device)


class StochasticDDIMScheduler(DDIMScheduler):
    """MONAI's ``DDIMScheduler`` with its ``eta`` fixed at construction, so loops that call
    ``step(model_output, t, sample)`` (MONAI's inferers) sample with it: 0 is deterministic DDIM, 1 draws the DDPM
    posterior variance on the strided schedule. Step noise comes from ``generator`` (set it per batch for
    reproducible samples; None uses the global RNG).

    A stochastic sampler forgives denoising errors that deterministic DDIM accumulates: on the demo label model,
    DDIM(50, eta 0) samples had latents 40 % wider than the data's and CSF +60 %, eta 1 matched the data.

    ``timestep_spacing``: ``"linspace"`` (MONAI's: from T - 1 down to 0) or ``"leading"`` (LDM's and diffusers':
    ``0, T/N, ..., T - T/N``, reversed). Leading spacing never starts at T - 1, where the cosine schedule has
    alpha_bar = 2e-9: an epsilon error there is divided by sqrt(alpha_bar) into the predicted x0 and the samples
    diverge (measured on the demo prostate model: latent std 1000 instead of 1).
    """

    def __init__(self, eta: float = 0.0, timestep_spacing: str = "linspace", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}.")
        if timestep_spacing not in ("linspace", "leading"):
            raise ValueError(f"timestep_spacing must be 'linspace' or 'leading', got {timestep_spacing!r}.")
        self.eta, self.timestep_spacing = float(eta), timestep_spacing
        self.generator: torch.Generator | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        if getattr(self, "timestep_spacing", "linspace") == "leading":  # unset while DDIMScheduler.__init__ runs
            step = self.num_train_timesteps // num_inference_steps
            self.timesteps = (
                torch.arange(num_inference_steps - 1, -1, -1, device=device).long() * step + self.steps_offset
            )

    def step(self, model_output, timestep, sample, eta=None, generator=None):  # type: ignore[override]
        eta = self.eta if eta is None else eta
        return super().step(model_output, timestep, sample, eta, generator if generator is not None else self.generator)


def named_batch(images: torch.Tensor, names: Sequence[str], spacing: Sequence[float] | None = None) -> MetaTensor:
    """Samples ``[B, C, *spatial]`` as a batched ``MetaTensor`` that ``SaveImaged`` writes as ``<name>_<postfix>``,
    with a diagonal affine of ``spacing`` (mm; default 1)."""
    spacing = [float(v) for v in (spacing if spacing is not None else [1.0] * (images.ndim - 2))][:3]
    affine = torch.diag(torch.tensor([*spacing, *([1.0] * (3 - len(spacing))), 1.0], dtype=torch.float64))
    output = MetaTensor(images, affine=affine)
    output.is_batch = True
    output.meta["affine"] = affine.unsqueeze(0).repeat(len(images), 1, 1)
    output.meta["filename_or_obj"] = list(names)
    return output


def step_noise_seed(seeds: Sequence[int]) -> int:
    """Seed of a batch's step noise (stochastic samplers), mixed from the samples' seeds. It must differ from every
    sample seed: a generator seeded with a sample's own seed would draw that sample's initial noise again at the
    first step, correlating the two (on the demo label model this alone raised the CSF fraction by a third)."""
    return int(np.random.SeedSequence([int(seed) for seed in seeds] + [1]).generate_state(1)[0])


def make_scheduler(
    name: str,
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    eta: float = 0.0,
    timestep_spacing: str = "linspace",
    **karras_args,
):
    """Build a noise scheduler by name with one noise schedule (a beta range, ignored by ``"cosine"``), so a model
    trained with DDPM can be sampled with any of them: MONAI's ``"ddpm"``, ``"ddim"``, ``"pndm"``, or the EDM samplers
    ``"euler"``, ``"heun"``, ``"euler_ancestral"``, ``"dpmpp_2m"`` (:class:`~medgen_common.karras.KarrasScheduler`;
    ``karras_args`` such as ``s_churn`` go to it), or MONAI's ``"rflow"`` for models trained with rectified flow
    (``karras_args`` then go to ``RFlowScheduler``). Every one plans ``len(scheduler.timesteps)`` network calls.

    ``clip_sample`` applies to DDPM/DDIM (PNDM never clips): it bounds each step's predicted x0 to
    ``[-clip_sample_range, clip_sample_range]``. Latents are not bounded to [-1, 1], so it defaults to False; a
    latent model whose schedule ends at a vanishing signal (the cosine schedule's last beta is 0.999) clips to a
    range of a few latent SDs, since there a noise prediction error is amplified by ``1 / sqrt(alpha_bar)``.
    ``eta`` and ``timestep_spacing`` are DDIM's (see :class:`StochasticDDIMScheduler`); other schedulers reject a
    non-default one."""
    import monai.networks.schedulers as schedulers

    if name not in SCHEDULERS and name not in SOLVERS and name != "rflow":
        raise ValueError(f"unknown scheduler '{name}'; choose one of {sorted(SCHEDULERS) + ['rflow', *SOLVERS]}.")
    if clip_sample and name not in ("ddpm", "ddim"):
        raise ValueError(f"clip_sample applies to 'ddpm' and 'ddim' only, not '{name}'.")
    kwargs = dict(num_train_timesteps=num_train_timesteps, schedule=schedule)
    if schedule != "cosine":  # the cosine schedule (Nichol & Dhariwal) has no beta range
        kwargs.update(beta_start=beta_start, beta_end=beta_end)
    kwargs["prediction_type"] = prediction_type
    if karras_args and name not in (*SOLVERS, "rflow"):
        raise ValueError(f"{sorted(karras_args)} apply to the EDM samplers {list(SOLVERS)} only, not '{name}'.")
    if name == "rflow":  # velocity-trained models only: its step integrates v, whatever the noise schedule
        if (
            schedule != "scaled_linear_beta"
            or prediction_type != "epsilon"
            or eta != 0.0
            or timestep_spacing != "linspace"
        ):
            raise ValueError("'rflow' has no noise schedule, prediction type, eta or spacing to set.")
        return schedulers.RFlowScheduler(num_train_timesteps=num_train_timesteps, **karras_args)
    if name in SOLVERS:
        if eta != 0.0 or timestep_spacing != "linspace":
            raise ValueError(
                f"eta and timestep_spacing apply to DDIM only, got eta={eta}, {timestep_spacing!r} for '{name}'."
            )
        return KarrasScheduler(solver=name, **kwargs, **karras_args)
    if name in ("ddpm", "ddim"):
        if clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}.")
        kwargs.update(clip_sample=clip_sample, clip_sample_min=-clip_sample_range, clip_sample_max=clip_sample_range)
    if name == "pndm":
        kwargs["skip_prk_steps"] = True
    if name == "ddim":
        return StochasticDDIMScheduler(eta=eta, timestep_spacing=timestep_spacing, **kwargs)
    if eta != 0.0 or timestep_spacing != "linspace":
        raise ValueError(
            f"eta and timestep_spacing apply to DDIM only, got eta={eta}, {timestep_spacing!r} for '{name}'."
        )
    if name == "ddpm":
        return TrainingGridDDPMScheduler(**kwargs)
    return getattr(schedulers, SCHEDULERS[name])(**kwargs)


def make_sample_specs(
    num_samples: int,
    seed: int = 0,
    condition: Sequence[float] | None = None,
    condition_low: Sequence[float] | None = None,
    condition_high: Sequence[float] | None = None,
    condition_probability: float = 0.5,
    condition_name: str = "lesion_size_condition",
) -> list[dict]:
    """Build ``num_samples`` specifications ``{"seed": int, condition_name: float32 array [1, L]}``.

    - ``condition`` given: every sample gets it.
    - otherwise ``condition_low``/``condition_high`` given: each entry is on with ``condition_probability`` and
      then drawn from U(low, high), else 0 (the brainSPADE sampler's rule).
    - neither: no condition key (unconditional sampling).

    The seed of sample ``i`` is ``seed + i``; conditions are drawn from ``numpy.random.default_rng(seed)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    rng = np.random.default_rng(seed)
    specs = []
    for index in range(num_samples):
        spec: dict = {"seed": int(seed) + index}
        if condition is not None:
            spec[condition_name] = np.asarray(condition, dtype=np.float32)[None]
        elif condition_low is not None and condition_high is not None:
            low, high = np.asarray(condition_low, float), np.asarray(condition_high, float)
            if low.shape != high.shape or np.any(low > high):
                raise ValueError(f"condition ranges must have one shape and low <= high, got {low} and {high}.")
            present = rng.random(low.shape) < condition_probability
            spec[condition_name] = np.where(present, rng.uniform(low, high), 0.0).astype(np.float32)[None]
        specs.append(spec)
    return specs


class SeededNoisePrepareBatch:
    """``prepare_batch`` for sampling: Gaussian noise ``[B, *noise_shape]`` from each item's own seed.

    Returns ``(noise, None, (), {"conditioning": [B, 1, L], "seeds": [B]})``; the conditioning key is only present
    when ``condition_name`` is set.
    """

    def __init__(self, noise_shape: Sequence[int], condition_name: str | None = None):
        self.noise_shape, self.condition_name = [int(s) for s in noise_shape], condition_name

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        seeds = [int(s) for s in torch.as_tensor(batchdata["seed"]).flatten().tolist()]
        noise = torch.stack(
            [torch.randn(self.noise_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device)
        infer_kwargs: dict = {"seeds": seeds}
        if self.condition_name is not None:
            infer_kwargs["conditioning"] = torch.as_tensor(batchdata[self.condition_name]).float().to(device)
            if infer_kwargs["conditioning"].ndim != 3:
                raise ValueError(
                    f"'{self.condition_name}' must batch to [B, 1, L], got shape {tuple(infer_kwargs['conditioning'].shape)}."
                )
        return noise, None, (), infer_kwargs


class LatentDiffusionSampler(Inferer):
    """Sample with MONAI's ``LatentDiffusionInferer`` and return decoded outputs as ``MetaTensor`` s.

    Args:
        autoencoder: trained ``AutoencoderKL`` (decoder used).
        scheduler: a MONAI scheduler (DDPM, DDIM, PNDM, ...); ``set_timesteps(num_inference_steps)`` is called.
        num_inference_steps: denoising steps.
        scale_factor: latent scale used in training.
        guidance_scale: classifier-free guidance weight; 1 is plain conditional sampling.
        output_activation: ``"softmax"`` over channels (probabilistic label maps), ``"sigmoid"`` or None.
        output_temperature: the decoded logits are divided by it before the activation (see
            :func:`medgen_common.engines.fit_output_temperature`).
        spacing: voxel size in mm written in the output affine.
        ldm_latent_shape, autoencoder_latent_shape: pad/crop between the autoencoder latent and the diffusion
            model's input, as in ``LatentDiffusionInferer``.
        amp: use autocast on CUDA.
        verbose: show a progress bar.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scheduler,
        num_inference_steps: int,
        scale_factor: float = 1.0,
        guidance_scale: float = 1.0,
        output_activation: str | None = "softmax",
        output_temperature: float = 1.0,
        spacing: Sequence[float] | None = None,
        ldm_latent_shape: Sequence[int] | None = None,
        autoencoder_latent_shape: Sequence[int] | None = None,
        amp: bool = True,
        verbose: bool = True,
    ):
        super().__init__()
        self.autoencoder, self.scheduler = autoencoder, scheduler
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.output_activation, self.spacing, self.amp, self.verbose = output_activation, spacing, amp, verbose
        self.output_temperature = float(output_temperature)
        self.inferer = LatentDiffusionInferer(
            scheduler,
            scale_factor=float(scale_factor),
            ldm_latent_shape=list(ldm_latent_shape) if ldm_latent_shape is not None else None,
            autoencoder_latent_shape=list(autoencoder_latent_shape) if autoencoder_latent_shape is not None else None,
        )

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: nn.Module, conditioning=None, seeds=None):  # type: ignore[override]
        self.scheduler.set_timesteps(num_inference_steps=self.num_inference_steps)
        if isinstance(self.scheduler, (StochasticDDIMScheduler, KarrasScheduler)) and seeds is not None:
            self.scheduler.generator = torch.Generator(inputs.device).manual_seed(step_noise_seed(seeds))
        self.autoencoder.eval()
        network.eval()
        device = inputs.device
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=autocast_enabled(device, self.amp)):
            decoded = self.inferer.sample(
                input_noise=inputs,
                autoencoder_model=self.autoencoder,
                diffusion_model=network,
                scheduler=self.scheduler,
                conditioning=conditioning,
                mode="crossattn",
                cfg=self.guidance_scale if conditioning is not None and self.guidance_scale != 1.0 else None,
                verbose=self.verbose,
            )
        decoded = apply_output_activation(
            torch.as_tensor(decoded).float(), self.output_activation, self.output_temperature
        )
        names = (
            [f"sample_{s:06d}" for s in seeds]
            if seeds is not None
            else [f"sample_{i:06d}" for i in range(len(decoded))]
        )
        return named_batch(decoded, names, self.spacing)
