"""EDM (Karras et al. 2022) samplers for models trained as discrete-time VP diffusions with a MONAI noise schedule.

MONAI has DDPM, DDIM, PNDM and RFlow schedulers but no Karras-sigma Euler/Heun or DPM-Solver. ``KarrasScheduler``
adds them behind MONAI's scheduler interface (``set_timesteps``, ``timesteps``, ``step(output, t, sample)``), so every
sampling loop that calls the network once per entry of ``timesteps`` (``guided_sample``, MONAI's inferers) runs them
unchanged, and ``len(scheduler.timesteps)`` is the number of network evaluations (NFE).

A model trained on ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` sees the variance-exploding sample
``x_ve = x_t / sqrt(abar_t)`` at noise level ``sigma_t = sqrt((1 - abar_t) / abar_t)``. The solvers integrate the
probability-flow ODE ``dx_ve / dsigma = (x_ve - D(x_ve, sigma)) / sigma`` in that form; the loop keeps holding
VP-scaled samples. Noise levels are Karras-spaced (rho 7) and quantised to the trained timesteps, so the network
is only ever called at integer timesteps it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.schedulers import Scheduler

__all__ = ["KarrasScheduler", "SOLVERS", "karras_sigmas"]

SOLVERS = ("euler", "heun", "euler_ancestral", "dpmpp_2m")


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (Eq. 5): ``num_steps`` values from ``sigma_max`` down to ``sigma_min``, float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    ramp = (
        torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    )
    inv_rho = 1.0 / rho
    return (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


class KarrasScheduler(Scheduler):
    """Karras-sigma sampler with MONAI's scheduler interface.

    Args:
        num_train_timesteps, schedule, schedule_args: the training noise schedule (as for ``DDPMScheduler``).
        solver: ``"euler"`` (1 NFE per step), ``"heun"`` (EDM Alg. 1/2: 2 NFE per step, Euler on the last,
            ``2 * steps - 1`` in all), ``"euler_ancestral"`` (stochastic Euler of k-diffusion/diffusers, the MediSyn
            default) or ``"dpmpp_2m"`` (DPM-Solver++(2M), multistep, 1 NFE per step).
        rho: Karras schedule exponent.
        sigma_max: the highest noise level sampled (EDM's 80), capped at the trained maximum. Schedules whose last
            timesteps have almost no signal (cosine: sigma 2e4 at t = 999) would otherwise spend most Karras levels
            where every level rounds to the same timestep, and divide the first step's epsilon error by ~1e-5.
        s_churn, s_tmin, s_tmax, s_noise: EDM Alg. 2 stochasticity for Euler and Heun (``s_churn`` 0 is the
            deterministic ODE solve; EDM-Lx used 40, 0.02, 100, 1.003). The raised level is rounded up to a trained
            timestep.
        prediction_type: what the network predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Step noise (churn, ancestral) comes from the ``generator`` passed to ``step`` (one per sample, or one for the
    batch), else from ``self.generator``, else the global RNG.
    """

    per_sample_generators = (
        True  # ``step`` takes one generator per sample and must see the whole batch (it keeps state)
    )

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        solver: str = "heun",
        rho: float = 7.0,
        sigma_max: float = 80.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        prediction_type: str = "epsilon",
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver '{solver}'; choose one of {list(SOLVERS)}.")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got '{prediction_type}'.")
        if s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {s_churn}.")
        if s_churn > 0 and solver not in ("euler", "heun"):
            raise ValueError(f"s_churn applies to the euler and heun solvers, not '{solver}'.")
        if sigma_max <= 0:
            raise ValueError(f"sigma_max must be positive, got {sigma_max}.")
        self.solver, self.rho, self.prediction_type = solver, float(rho), prediction_type
        self.sigma_max = float(sigma_max)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = (
            float(s_churn),
            float(s_tmin),
            float(s_tmax),
            float(s_noise),
        )
        abar = self.alphas_cumprod.double()
        self.train_sigmas = ((1 - abar) / abar).sqrt()  # increasing with t
        self.generator: torch.Generator | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.num_inference_steps = 0

    def _timestep(self, sigma: float, round_up: bool = False) -> int:
        """The trained timestep whose sigma is nearest to ``sigma`` in log space (the first at or above it)."""
        if round_up:
            above = torch.nonzero(self.train_sigmas >= sigma * (1 - 1e-12))
            return int(above[0]) if len(above) else self.num_train_timesteps - 1
        return int(torch.argmin((self.train_sigmas.log() - math.log(sigma)).abs()))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Plan the network evaluations of ``num_inference_steps`` solver steps; ``timesteps`` lists them in order.

        Karras levels that round to the same trained timestep are stepped once, so a schedule finer than the trained
        grid near sigma_min makes fewer steps than asked (``len(timesteps)`` is always the NFE)."""
        steps = int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        sigma_min, sigma_max = float(self.train_sigmas[0]), min(self.sigma_max, float(self.train_sigmas[-1]))
        sigma_max = float(self.train_sigmas[self._timestep(sigma_max)])  # start on a trained level
        levels = [self._timestep(float(s)) for s in karras_sigmas(steps, sigma_min, sigma_max, self.rho)]
        levels = list(dict.fromkeys(levels))  # a schedule finer than the trained grid repeats levels: step once
        gamma = min(self.s_churn / steps, math.sqrt(2) - 1)
        # (timestep evaluated, sigma evaluated, sigma after the step, role) per network call
        self._plan: list[tuple[int, float, float, str]] = []
        for i, t in enumerate(levels):
            sigma = float(self.train_sigmas[t])
            sigma_next = float(self.train_sigmas[levels[i + 1]]) if i + 1 < len(levels) else 0.0
            if gamma > 0 and self.s_tmin <= sigma <= self.s_tmax and i > 0:  # the first level is the trained maximum
                t = self._timestep(sigma * (1 + gamma), round_up=True)
            self._plan.append((t, float(self.train_sigmas[t]), sigma_next, "step"))
            if self.solver == "heun" and sigma_next > 0:
                self._plan.append((levels[i + 1], sigma_next, sigma_next, "correct"))
        self.timesteps = torch.as_tensor([p[0] for p in self._plan], dtype=torch.long, device=device)
        self.num_inference_steps = len(levels)
        self._call = 0
        self._previous_denoised: torch.Tensor | None = None
        self._previous_sigma = 0.0

    def _denoised(self, model_output: torch.Tensor, sample_vp: torch.Tensor, t: int) -> torch.Tensor:
        abar = self.alphas_cumprod[t].to(sample_vp)
        if self.prediction_type == "epsilon":
            return (sample_vp - (1 - abar).sqrt() * model_output) / abar.sqrt()
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * sample_vp - (1 - abar).sqrt() * model_output
        return model_output

    def _noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        generator = self.generator if generator is None else generator
        if isinstance(generator, Sequence):
            if len(generator) != len(like):
                raise ValueError(f"need one generator per sample: {len(generator)} for a batch of {len(like)}.")
            return torch.stack([torch.randn(like.shape[1:], generator=g, device=g.device) for g in generator]).to(like)
        return torch.randn(
            like.shape, generator=generator, device=like.device if generator is None else generator.device
        ).to(like)

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One network evaluation's update: VP ``sample`` at ``timestep`` -> (VP sample for the next evaluation, x0)."""
        if not getattr(self, "_plan", None) or self._call >= len(self._plan):
            raise RuntimeError("call set_timesteps before stepping, once per entry of timesteps.")
        t, sigma, sigma_next, role = self._plan[self._call]
        if int(timestep) != t:
            raise ValueError(f"expected timestep {t} at network call {self._call}, got {int(timestep)}.")
        self._call += 1
        sigma_following = self._plan[self._call][1] if self._call < len(self._plan) else 0.0  # next call's level
        x = sample.double() * math.sqrt(1 + sigma**2)  # VP -> VE
        denoised = self._denoised(model_output.double(), sample.double(), t)
        slope = (x - denoised) / sigma
        if role == "correct":  # Heun: average the slopes at both ends of the step taken from the saved start point
            x_start, slope_start, sigma_start = self._heun_start
            x = self._churn(
                x_start + (sigma - sigma_start) * 0.5 * (slope_start + slope), sigma, sigma_following, generator
            )
        elif self.solver == "heun" and sigma_next > 0:  # predictor: Euler to sigma_next, evaluated by the next call
            self._heun_start = (x, slope, sigma)
            x = x + (sigma_next - sigma) * slope
        elif self.solver == "euler_ancestral" and sigma_next > 0:
            sigma_up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
            x = x + (sigma_down - sigma) * slope + sigma_up * self._noise(x, generator)
        elif self.solver == "dpmpp_2m" and sigma_next > 0:
            h = math.log(sigma / sigma_next)
            corrected = denoised
            if self._previous_denoised is not None:
                r = math.log(self._previous_sigma / sigma) / h
                corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self._previous_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * corrected
            self._previous_denoised, self._previous_sigma = denoised, sigma
        else:  # Euler (also every solver's last step, which lands on the denoised estimate)
            x = self._churn(x + (sigma_next - sigma) * slope, sigma_next, sigma_following, generator)
        return (x / math.sqrt(1 + sigma_following**2)).to(sample.dtype), denoised.to(sample.dtype)

    def _churn(self, x: torch.Tensor, sigma: float, sigma_hat: float, generator) -> torch.Tensor:
        """EDM Alg. 2: raise the noise level from ``sigma`` to ``sigma_hat`` with fresh noise."""
        if sigma_hat <= sigma:
            return x
        return x + math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise * self._noise(x, generator)
