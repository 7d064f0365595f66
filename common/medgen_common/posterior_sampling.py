"""Posterior sampling for inverse problems with a diffusion prior (chapter 7): one VP epsilon-network viewed as a
denoiser and as a VE score, and the solvers that combine it with a measurement operator (``medgen_common.mri``).

- :class:`DiffusionPrior`: ``eps(x, t)`` of a ``DiffusionModelUNet`` trained with a DDPM schedule, Tweedie's
  denoiser, and the VE view sigma_t = sqrt((1 - abar_t) / abar_t), s_VE(x, sigma_t) = -eps(sqrt(abar_t) x, t) /
  sigma_t (chapter L2135), so one prior drives every solver. It counts network evaluations (``nfe``).
- :func:`dds`: Decomposed Diffusion Sampler (Eqs. 7.39-7.40): DDIM steps whose Tweedie estimate is made data
  consistent (the exact projection for single-coil Cartesian data, a few CG steps otherwise).
- :func:`predictor_corrector`: score-MRI (Algorithm 7.1): reverse-diffusion predictor and Langevin corrector on the
  VE levels of the prior, each followed by the exact data-consistency projection; per coil with a root-sum-of-squares
  combination for multi-coil data (Algorithm 7.2).
- :func:`dps`: diffusion posterior sampling (Eq. 7.33): ancestral steps plus the gradient of ||y - A x0_hat||
  through the network.
- :func:`mcg`: manifold constrained gradient: the DPS step plus a projection onto the noisy measurement of each
  level, and hard data consistency at the end.
- :func:`posterior_statistics`: pixel-wise posterior mean and standard deviation from K samples.

Images are complex tensors ``[B, H, W]``. ``image_type="real"`` uses a 1-channel prior and keeps images real (the
data-consistency step takes the real part, score-MRI's real mode); ``"complex"`` a 2-channel (real, imaginary)
prior. Every solver takes the operator (``A``, ``AH``, ``normal``; ``project`` where it exists) and the measured
k-space ``y``, is seeded by a ``torch.Generator``, and never needs retraining when the mask changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .mri import (
    MultiCoilMRI, SingleCoilMRI, channels_to_complex, complex_to_channels, conjugate_gradient, ifft2c,
    root_sum_of_squares,
)  # fmt: skip

__all__ = ["DiffusionPrior", "dds", "predictor_corrector", "dps", "mcg", "posterior_statistics"]

IMAGE_TYPES = ("real", "complex")


class DiffusionPrior:
    """A VP epsilon-prediction network with its cumulative alphas.

    Args:
        network: ``network(x [B, C, H, W], timesteps [B]) -> eps [B, C, H, W]`` (e.g. MONAI ``DiffusionModelUNet``).
        alphas_cumprod: ``[T]`` cumulative products of the training schedule (``DDPMScheduler.alphas_cumprod``).
        image_type: ``"real"`` (C = 1) or ``"complex"`` (C = 2: real, imaginary).
    """

    def __init__(self, network: Callable, alphas_cumprod: torch.Tensor, image_type: str = "complex"):
        if image_type not in IMAGE_TYPES:
            raise ValueError(f"image_type must be one of {IMAGE_TYPES}, got {image_type!r}.")
        self.network, self.image_type = network, image_type
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_train_timesteps = len(alphas_cumprod)
        self.nfe = 0

    def to_channels(self, image: torch.Tensor) -> torch.Tensor:
        """Complex ``[B, H, W]`` -> network input ``[B, C, H, W]`` (float32)."""
        if self.image_type == "real":
            return image.real.float().unsqueeze(1)
        return complex_to_channels(image)

    def from_channels(self, channels: torch.Tensor) -> torch.Tensor:
        """Network-space ``[B, C, H, W]`` -> complex ``[B, H, W]`` (complex64)."""
        if self.image_type == "real":
            return torch.complex(channels[:, 0], torch.zeros_like(channels[:, 0]))
        return channels_to_complex(channels)

    def abar(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    def sigma(self, t: int) -> float:
        """VE noise level of VP timestep ``t``."""
        return ((1.0 - self.abar(t)) / self.abar(t)) ** 0.5

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """One network evaluation at VP timestep ``t`` for every sample of ``x [B, C, H, W]``."""
        self.nfe += 1
        return self.network(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()

    def score_ve(self, x_ve: torch.Tensor, t: int) -> torch.Tensor:
        """VE score at sigma_t of ``x_ve [B, C, H, W]``: -eps(sqrt(abar_t) x, t) / sigma_t."""
        return -self.eps(self.abar(t) ** 0.5 * x_ve, t) / self.sigma(t)


def _timesteps(prior: DiffusionPrior, num_steps: int, spacing_power: float = 1.0) -> list[int]:
    """``num_steps`` distinct VP timesteps from T - 1 down to 0 at ``(T - 1) u^spacing_power``, ``u`` evenly spaced
    in [1, 0]: power 1 is even spacing, 2 is DDIM's "quadratic", and larger powers put more steps at low noise.
    With ``num_steps = T`` every spacing is the full training grid."""
    if not 1 <= num_steps <= prior.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {prior.num_train_timesteps}], got {num_steps}.")
    if spacing_power <= 0:
        raise ValueError(f"spacing_power must be positive, got {spacing_power}.")
    fraction = torch.linspace(1.0, 0.0, num_steps, dtype=torch.float64) ** spacing_power
    rounded = (fraction * (prior.num_train_timesteps - 1)).round().long().tolist()
    # rounding merges steps (low-noise ones for powers > 1, high-noise ones for powers < 1): leave step i room for
    # the i steps above it, then keep the sequence strictly decreasing from the end
    timesteps = [min(t, prior.num_train_timesteps - 1 - i) for i, t in enumerate(rounded)]
    for i in range(num_steps - 2, -1, -1):
        timesteps[i] = max(timesteps[i], timesteps[i + 1] + 1)
    return timesteps


def _data_consistency(prior: DiffusionPrior, operator, image: torch.Tensor, measured: torch.Tensor,
                      cg_iterations: int) -> torch.Tensor:  # fmt: skip
    """Nearest image agreeing with the data: the exact projection where the operator has one, else CG on the
    normal equations warm-started at ``image``; real images stay real."""
    if hasattr(operator, "project"):
        consistent = operator.project(image, measured)
    else:
        consistent = conjugate_gradient(operator.normal, operator.AH(measured), image, iterations=cg_iterations)
    return (
        torch.complex(consistent.real, torch.zeros_like(consistent.real)) if prior.image_type == "real" else consistent
    )


def _noise(shape, reference: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (a CPU generator also serves CUDA runs)."""
    device = generator.device if generator is not None else reference.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(reference.device)


def _initial(prior: DiffusionPrior, measured: torch.Tensor, shape, generator) -> torch.Tensor:
    channels = 1 if prior.image_type == "real" else 2
    return _noise((shape[0], channels, *shape[-2:]), measured, generator)


def dds(
    prior: DiffusionPrior, operator, measured: torch.Tensor, image_shape: tuple[int, int, int], num_steps: int = 50,
    cg_iterations: int = 5, eta: float = 0.85, spacing_power: float = 1.0, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Decomposed Diffusion Sampler (chapter Eqs. 7.39-7.40): ``num_steps`` network evaluations on timesteps
    spaced by ``spacing_power`` (1 = the paper's even spacing; see ``_timesteps``).

    Each step: x0_hat = Tweedie(x_t); x0_hat <- data consistency (exact projection, or ``cg_iterations`` CG steps
    on A^H A warm-started at x0_hat); x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) (eta z + sqrt(1 -
    eta^2) eps), DDS's noise mix (not the DDIM paper's eta). Returns the last data-consistent estimate ``[B, H, W]``.
    """
    timesteps = _timesteps(prior, num_steps, spacing_power)
    x = _initial(prior, measured, image_shape, generator)
    with torch.no_grad():
        for t, t_next in zip(timesteps, timesteps[1:] + [None]):
            eps = prior.eps(x, t)
            x0 = (x - (1.0 - prior.abar(t)) ** 0.5 * eps) / prior.abar(t) ** 0.5
            image = _data_consistency(prior, operator, prior.from_channels(x0), measured, cg_iterations)
            if t_next is not None:
                abar_next = prior.abar(t_next)
                noise = eta * _noise(x.shape, x, generator) + (1.0 - eta**2) ** 0.5 * eps
                x = abar_next**0.5 * prior.to_channels(image) + (1.0 - abar_next) ** 0.5 * noise
    return image


def predictor_corrector(
    prior: DiffusionPrior, operator, measured: torch.Tensor, image_shape: tuple[int, int, int], num_levels: int = 150,
    snr: float = 0.16, corrector_steps: int = 1, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """score-MRI (chapter Algorithm 7.1, the book's order: predictor, then corrector), on the VE levels
    sigma_t of ``num_levels`` VP timesteps; ``num_levels * (1 + corrector_steps)`` network evaluations. The
    operator must have an exact ``project`` (single-coil Cartesian); for SENSE data (``MultiCoilMRI``, ``measured``
    ``[B, C, H, W]``) this is Algorithm 7.2: every coil image, scaled to a zero-filled peak of 1, is sampled as its
    own batch item with its own hard data consistency, and the result is their root sum of squares (a magnitude
    image, zero phase). Returns the last noise-free mean ``[B, H, W]``."""
    if isinstance(operator, MultiCoilMRI):
        batch, coils, height, width = measured.shape
        per_coil = measured.reshape(batch * coils, height, width)
        peak = ifft2c(per_coil).abs().amax((-2, -1), keepdim=True).clamp_min(1e-12)  # each coil at the prior's scale
        coil_images = predictor_corrector(
            prior, SingleCoilMRI(operator.mask), per_coil / peak, (batch * coils, height, width), num_levels, snr,
            corrector_steps, generator,
        ) * peak  # fmt: skip
        return root_sum_of_squares(coil_images.reshape(batch, coils, height, width)).to(torch.complex64)
    if not hasattr(operator, "project"):
        raise ValueError("predictor_corrector needs an operator with an exact projection (single-coil Cartesian).")
    timesteps = _timesteps(prior, num_levels)
    sigmas = [prior.sigma(t) for t in timesteps] + [0.0]

    def consistent(x):
        return prior.to_channels(_data_consistency(prior, operator, prior.from_channels(x), measured, 0))

    x = consistent(sigmas[0] * _initial(prior, measured, image_shape, generator))
    with torch.no_grad():
        for index, t in enumerate(timesteps):
            step = sigmas[index] ** 2 - sigmas[index + 1] ** 2
            mean = consistent(x + step * prior.score_ve(x, t))
            x = consistent(mean + step**0.5 * _noise(x.shape, x, generator))
            for _ in range(corrector_steps):
                score = prior.score_ve(x, t)
                z = _noise(x.shape, x, generator)
                ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
                step_size = 2.0 * float(snr * ratio) ** 2
                mean = consistent(x + step_size * score)
                x = consistent(mean + (2.0 * step_size) ** 0.5 * z)
    return prior.from_channels(mean)


def _guided_ancestral(prior, operator, measured, image_shape, num_steps, step_size, generator, manifold: bool):
    """The loop shared by DPS and MCG: ancestral (DDIM eta = 1) steps on ``num_steps`` timesteps, each followed by
    x_{t-1} -= ``step_size`` * grad_{x_t} ||y - A x0_hat(x_t)|| (the authors' unsquared norm per sample), through
    the network; with ``manifold`` also the projection onto the noisy measurement sqrt(abar_{t-1}) y +
    sqrt(1 - abar_{t-1}) A z (MCG) and a final hard data consistency."""
    timesteps = _timesteps(prior, num_steps)
    x = _initial(prior, measured, image_shape, generator)
    for t, t_next in zip(timesteps, timesteps[1:] + [None]):
        x = x.detach().requires_grad_(True)
        eps = prior.eps(x, t)
        x0 = (x - (1.0 - prior.abar(t)) ** 0.5 * eps) / prior.abar(t) ** 0.5
        if t_next is None:
            break
        residual = (operator.A(prior.from_channels(x0)) - measured).abs().pow(2).flatten(1).sum(1).sqrt()
        (gradient,) = torch.autograd.grad(residual.sum(), x)
        abar, abar_prev = prior.abar(t), prior.abar(t_next)
        sigma = ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        with torch.no_grad():
            x = (abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps + sigma * _noise(x.shape, x, generator)
                 - step_size * gradient)  # fmt: skip
            if manifold:
                noisy = abar_prev**0.5 * measured + (1 - abar_prev) ** 0.5 * operator.A(
                    prior.from_channels(_noise(x.shape, x, generator)))  # fmt: skip
                x = prior.to_channels(_data_consistency(prior, operator, prior.from_channels(x), noisy, 0))
    image = prior.from_channels(x0.detach())
    return _data_consistency(prior, operator, image, measured, 0) if manifold else image


def dps(
    prior: DiffusionPrior, operator, measured: torch.Tensor, image_shape: tuple[int, int, int], num_steps: int = 60,
    step_size: float = 1.0, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Diffusion posterior sampling (chapter Eq. 7.33): ancestral (DDIM eta = 1) steps on ``num_steps`` timesteps,
    each followed by x_{t-1} -= ``step_size`` * grad_{x_t} ||y - A x0_hat(x_t)|| (the authors' unsquared norm per
    sample), differentiating through the network; no clipping of x0_hat (complex MRI is signed). Returns
    x0_hat of the last step ``[B, H, W]``."""
    return _guided_ancestral(prior, operator, measured, image_shape, num_steps, step_size, generator, manifold=False)


def mcg(
    prior: DiffusionPrior, operator, measured: torch.Tensor, image_shape: tuple[int, int, int], num_steps: int = 60,
    step_size: float = 1.0, generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Manifold constrained gradient (ref. [6], chapter Prop. 7.1; the DPS code's variant): the DPS step, then the
    projection onto the noisy measurement y_{t-1} = sqrt(abar_{t-1}) y + sqrt(1 - abar_{t-1}) A z, z ~ N(0, I);
    the returned x0_hat ``[B, H, W]`` is made exactly data consistent. Needs an exact ``project``."""
    if not hasattr(operator, "project"):
        raise ValueError("mcg needs an operator with an exact projection (single-coil Cartesian).")
    return _guided_ancestral(prior, operator, measured, image_shape, num_steps, step_size, generator, manifold=True)


def posterior_statistics(
    sample: Callable[[torch.Generator], torch.Tensor], num_samples: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-wise mean and standard deviation of the magnitude over ``num_samples`` posterior samples
    ``sample(generator) -> [B, H, W]``, each drawn with its own seed (``seed + k``). Returns two ``[B, H, W]``."""
    if num_samples < 2:
        raise ValueError(f"a standard deviation needs num_samples >= 2, got {num_samples}.")
    magnitudes = torch.stack([sample(torch.Generator().manual_seed(seed + k)).abs() for k in range(num_samples)])
    return magnitudes.mean(0), magnitudes.std(0)
