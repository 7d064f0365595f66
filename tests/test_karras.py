"""Karras/EDM samplers: network-call accounting, Heun's corrector input, convergence order on an analytic denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medgen_common.guidance import classifier_free_guidance, guided_sample
from medgen_common.karras import KarrasScheduler, karras_sigmas
from medgen_common.sampling import make_scheduler

DATA_MEAN, DATA_STD = 0.7, 0.4


class GaussianEpsilon(nn.Module):
    """Ideal epsilon predictor for 1-D Gaussian data N(DATA_MEAN, DATA_STD^2) under ``alphas_cumprod``; records calls."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod.double()
        self.calls: list[tuple[torch.Tensor, int]] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = int(timesteps.reshape(-1)[0])
        self.calls.append((x.clone(), t))
        abar = self.alphas_cumprod[t]
        sigma2 = (1 - abar) / abar
        x_ve = x.double() / abar.sqrt()
        denoised = DATA_MEAN + DATA_STD**2 / (DATA_STD**2 + sigma2) * (x_ve - DATA_MEAN)
        return ((x.double() - abar.sqrt() * denoised) / (1 - abar).sqrt()).to(x.dtype)


def solve(scheduler: KarrasScheduler, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, GaussianEpsilon]:
    network = GaussianEpsilon(scheduler.alphas_cumprod)
    scheduler.set_timesteps(steps)
    x = start.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(network(x, t.reshape(1)), t, x)[0]
    return x, network


def exact_solution(scheduler: KarrasScheduler, start: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE keeps (x_ve - mean) / sqrt(std^2 + sigma^2): map the start at sigma_max to sigma 0."""
    sigma_max = float(scheduler.train_sigmas[int(scheduler.timesteps[0])])
    x_ve = start.double() * math.sqrt(1 + sigma_max**2)
    return DATA_MEAN + (x_ve - DATA_MEAN) * DATA_STD / math.sqrt(DATA_STD**2 + sigma_max**2)


def test_karras_sigmas_run_from_max_to_min_with_rho_spacing():
    sigmas = karras_sigmas(5, 0.002, 80.0, 7.0)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    roots = sigmas ** (1 / 7)
    assert torch.allclose(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(4))  # uniform in sigma^(1/rho)


@pytest.mark.parametrize("solver, calls", [("euler", 20), ("heun", 39), ("dpmpp_2m", 20), ("euler_ancestral", 20)])
def test_network_calls_are_the_planned_timesteps(solver, calls):
    scheduler = KarrasScheduler(1000, "scaled_linear_beta", solver=solver, beta_start=0.0015, beta_end=0.0195)
    _, network = solve(scheduler, torch.randn(4, 1), 20)
    assert len(network.calls) == len(scheduler.timesteps) == calls


def test_heun_second_call_gets_the_euler_predicted_point_at_the_next_level():
    """Regression for the EDM-Lx bug: the corrector must evaluate (x', t_next), not repeat (x_hat, t_hat)."""
    scheduler = KarrasScheduler(1000, "linear_beta", solver="heun")
    start = torch.randn(3, 1, dtype=torch.float64)
    _, network = solve(scheduler, start, 10)
    (x0, t0), (x1, t1) = network.calls[:2]
    assert t1 == int(scheduler.timesteps[1]) and t1 < t0
    sigma0, sigma1 = float(scheduler.train_sigmas[t0]), float(scheduler.train_sigmas[t1])
    abar0 = scheduler.alphas_cumprod[t0].double()
    epsilon = GaussianEpsilon(scheduler.alphas_cumprod)(x0, torch.tensor([t0]))
    x_ve = x0 * math.sqrt(1 + sigma0**2)
    denoised = (x0 - (1 - abar0).sqrt() * epsilon) / abar0.sqrt()
    predicted = x_ve + (sigma1 - sigma0) * (x_ve - denoised) / sigma0
    assert torch.allclose(x1, predicted / math.sqrt(1 + sigma1**2), atol=1e-12)
    assert not torch.allclose(x1, x0)


def error_after(solver: str, steps: int) -> float:
    scheduler = KarrasScheduler(200_000, "linear_beta", solver=solver, beta_start=1e-6, beta_end=2e-4)
    start = torch.linspace(-2, 2, 9, dtype=torch.float64).unsqueeze(1)
    final, _ = solve(scheduler, start, steps)
    return float((final - exact_solution(scheduler, start)).abs().max())


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_error_shrinks_at_the_solver_order_when_steps_double(solver, order):
    errors = [error_after(solver, steps) for steps in (32, 64, 128)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(0.75 * 2**order < r < 1.5 * 2**order for r in ratios), (errors, ratios)


def test_heun_at_fifty_steps_samples_the_target_mean_and_spread():
    scheduler = KarrasScheduler(1000, "scaled_linear_beta", solver="heun", beta_start=0.0015, beta_end=0.0195)
    final, _ = solve(scheduler, torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0)), 50)
    assert float(final.mean()) == pytest.approx(DATA_MEAN, abs=0.01)
    assert float(final.std()) == pytest.approx(DATA_STD, rel=0.03)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_churn_is_seeded_and_changes_the_path(solver):
    def sample(s_churn, seed):
        scheduler = KarrasScheduler(1000, "linear_beta", solver=solver, s_churn=s_churn)
        scheduler.generator = torch.Generator().manual_seed(seed)
        return solve(scheduler, torch.ones(2, 1), 10)[0]

    assert torch.equal(sample(40.0, 1), sample(40.0, 1))
    assert not torch.allclose(sample(40.0, 1), sample(40.0, 2))
    assert not torch.allclose(sample(40.0, 1), sample(0.0, 1))


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown solver"):
        KarrasScheduler(solver="rk4")
    with pytest.raises(ValueError, match="s_churn applies"):
        KarrasScheduler(solver="dpmpp_2m", s_churn=1.0)
    scheduler = KarrasScheduler(solver="euler")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 999, torch.zeros(1))
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="expected timestep"):
        scheduler.step(torch.zeros(1), 3, torch.zeros(1))


class ConditionalEpsilon(nn.Module):
    """Mock noise predictor ``network(x, timesteps)`` whose output depends on the concatenated condition channel."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, timesteps, context=None):
        self.calls += 1
        return 0.1 * x[:, :1] + 0.3 * x[:, 1:2] + 1e-4 * timesteps.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "name, steps, calls", [("ddim", 12, 12), ("euler", 12, 12), ("heun", 12, 23), ("ddpm", 12, 12), ("rflow", 12, 12)]
)
def test_guided_sample_makes_one_network_call_per_planned_timestep(name, steps, calls):
    network = ConditionalEpsilon()
    scheduler = make_scheduler(name, steps if name == "ddpm" else 1000)  # DDPM samples on its training grid only
    result = guided_sample(
        network, scheduler, classifier_free_guidance(1.0), [torch.ones(2, 1, 4, 4)], [0, 1], 1, steps
    )
    assert result.nfe == network.calls == calls == len(scheduler.timesteps)
    assert torch.isfinite(result.latents).all()


@pytest.mark.parametrize("name", ["ddim", "euler_ancestral", "heun"])
def test_guided_sample_is_bit_identical_for_the_same_seeds(name):
    def run():
        scheduler = make_scheduler(name, 1000)
        guidance = classifier_free_guidance(1.0)
        return guided_sample(ConditionalEpsilon(), scheduler, guidance, [torch.ones(3, 1, 4, 4)], [5, 6, 7], 1, 10)

    assert torch.equal(run().latents, run().latents)


def test_stochastic_samples_do_not_depend_on_the_batch_they_are_drawn_in():
    def run(seeds):
        scheduler = make_scheduler("euler_ancestral", 1000)
        condition = torch.ones(len(seeds), 1, 4, 4)
        return guided_sample(ConditionalEpsilon(), scheduler, classifier_free_guidance(1.0), [condition], seeds, 1, 10)

    assert torch.allclose(run([3, 4]).latents[1], run([4]).latents[0], atol=1e-6)


def test_sampling_starts_at_edm_sigma_max_not_at_the_cosine_schedules_last_step():
    scheduler = KarrasScheduler(1000, "cosine", solver="heun")
    assert float(scheduler.train_sigmas[-1]) > 1e4  # alpha_bar ~ 2e-9 at t = 999
    scheduler.set_timesteps(10)
    assert float(scheduler.train_sigmas[int(scheduler.timesteps[0])]) == pytest.approx(80.0, rel=0.05)
    assert len(scheduler.timesteps) == 19  # 10 distinct levels: 2 * 10 - 1 calls
    with pytest.raises(ValueError, match="sigma_max must be positive"):
        KarrasScheduler(solver="euler", sigma_max=0.0)
