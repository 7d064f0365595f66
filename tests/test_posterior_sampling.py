"""Posterior-sampling solvers against a prior whose posterior is known: images of white Gaussian noise, for which
the optimal noise predictor is eps(x_t, t) = sqrt(1 - abar_t) x_t. Given noiseless single-coil data, the posterior
keeps the measured k-space and leaves every unmeasured coefficient standard normal (F is unitary)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medgen_common.mri import MultiCoilMRI, SingleCoilMRI, fft2c, make_mask, synthetic_coil_maps
from medgen_common.posterior_sampling import (
    DiffusionPrior,
    _timesteps,
    dds,
    dps,
    mcg,
    posterior_statistics,
    predictor_corrector,
)

SHAPE = (16, 16)
BATCH = 48


class GaussianOracle(torch.nn.Module):
    """The exact noise predictor for N(0, I) data under a DDPM schedule."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1) * x


def _prior(image_type: str = "complex") -> DiffusionPrior:
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod
    return DiffusionPrior(GaussianOracle(alphas_cumprod), alphas_cumprod, image_type)


def _measurement(operator, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    truth = torch.complex(torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator))
    return operator.A(truth).expand(BATCH, *SHAPE)


def _check_posterior(samples: torch.Tensor, operator: SingleCoilMRI, measured: torch.Tensor) -> None:
    kspace = fft2c(samples)
    mask = operator.mask
    torch.testing.assert_close(kspace[:, mask], measured[:, mask], atol=1e-4, rtol=1e-4)  # data kept exactly
    free = torch.view_as_real(kspace[:, ~mask])  # [B, n, 2]
    assert free.mean(0).abs().mean() < 0.35  # posterior mean 0 off the data (the zero-filled image)
    assert 0.7 < float(free.std(0).mean()) < 1.3  # and unit spread


@pytest.mark.parametrize(
    "solver, steps, nfe", [(dds, 50, 50), (predictor_corrector, 100, 200), (mcg, 60, 60)], ids=["dds", "pc", "mcg"]
)
def test_solvers_sample_the_known_posterior_and_count_evaluations(solver, steps, nfe):
    # MCG's gradient lies in the measured subspace here (the oracle is linear), which its projections overwrite
    prior = _prior()
    operator = SingleCoilMRI(make_mask("uniform1d", SHAPE, 4, center_fraction=0.125, seed=0))
    measured = _measurement(operator)
    keyword = "num_levels" if solver is predictor_corrector else "num_steps"
    samples = solver(
        prior, operator, measured, (BATCH, *SHAPE), **{keyword: steps}, generator=torch.Generator().manual_seed(1)
    )
    assert samples.shape == (BATCH, *SHAPE) and samples.is_complex()
    assert prior.nfe == nfe
    _check_posterior(samples, operator, measured)


@pytest.mark.parametrize("power", [0.1, 0.5, 1.0, 2.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [2, 10, 50, 200, 999, 1000])
def test_timestep_spacing_is_distinct_decreasing_and_spans_the_schedule(steps, power):
    timesteps = _timesteps(_prior(), steps, power)
    assert len(timesteps) == steps and timesteps[0] == 999 and timesteps[-1] == 0
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))


def test_timestep_spacing_power_moves_steps_to_low_noise():
    prior = _prior()
    assert _timesteps(prior, 50) == torch.linspace(999, 0, 50).round().long().tolist()  # power 1: even spacing
    assert _timesteps(prior, 1000, 3.0) == list(range(999, -1, -1))  # every spacing covers the full grid
    below_100 = [sum(t < 100 for t in _timesteps(prior, 50, power)) for power in (1.0, 2.0, 3.0)]
    assert below_100[0] < below_100[1] < below_100[2]
    assert below_100[0] == 5  # even spacing: 999 / 49 = 20.4 apart
    # (T-1) u^3 < 100 for u < 0.464: 23 of the 50 steps
    assert below_100[2] == 23


def test_dds_with_spacing_power_counts_evaluations_and_samples_the_posterior():
    prior = _prior()
    operator = SingleCoilMRI(make_mask("uniform1d", SHAPE, 4, center_fraction=0.125, seed=0))
    measured = _measurement(operator)
    samples = dds(prior, operator, measured, (BATCH, *SHAPE), num_steps=20, spacing_power=3.0,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert prior.nfe == 20
    _check_posterior(samples, operator, measured)


def test_dds_with_sense_uses_cg_and_fits_the_data():
    prior = _prior()
    operator = MultiCoilMRI(make_mask("poisson", SHAPE, 2, center_fraction=0.25, seed=0), synthetic_coil_maps(SHAPE, 4))
    generator = torch.Generator().manual_seed(0)
    truth = torch.complex(torch.randn(4, *SHAPE, generator=generator), torch.randn(4, *SHAPE, generator=generator))
    measured = operator.A(truth)
    samples = dds(prior, operator, measured, (4, *SHAPE), num_steps=20, cg_iterations=10, generator=generator)
    residual = (operator.A(samples) - measured).flatten(1).norm(dim=1) / measured.flatten(1).norm(dim=1)
    assert residual.max() < 0.05


def test_dps_pulls_samples_towards_the_data():
    operator = SingleCoilMRI(make_mask("uniform1d", SHAPE, 2, center_fraction=0.125, seed=0))
    measured = _measurement(operator)[:8]

    def residual(step_size):
        prior = _prior()
        samples = dps(prior, operator, measured, (8, *SHAPE), num_steps=30, step_size=step_size,
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
        assert prior.nfe == 30
        return float((operator.A(samples) - measured).abs().pow(2).sum().sqrt())

    residuals = [residual(step_size) for step_size in (0.0, 1.0, 4.0)]  # step 0: unconditional prior samples
    assert residuals[0] > residuals[1] > residuals[2] and residuals[2] < 0.2 * residuals[0]


def test_projection_solvers_refuse_operators_without_a_projection():
    single = SingleCoilMRI(make_mask("poisson", SHAPE, 2, center_fraction=0.25, seed=0))
    blurred = SimpleNamespace(A=single.A, AH=single.AH, normal=single.normal)  # no exact projection
    measured = single.A(torch.ones(1, *SHAPE, dtype=torch.complex64))
    for solver in (predictor_corrector, mcg):
        with pytest.raises(ValueError, match="exact projection"):
            solver(_prior(), blurred, measured, (1, *SHAPE))


def test_multi_coil_predictor_corrector_samples_each_coil_and_combines_them():
    maps = synthetic_coil_maps(SHAPE, 3)
    operator = MultiCoilMRI(make_mask("uniform1d", SHAPE, 4, center_fraction=0.125, seed=0), maps)
    generator = torch.Generator().manual_seed(4)
    truth = torch.complex(torch.randn(2, *SHAPE, generator=generator), torch.randn(2, *SHAPE, generator=generator))
    measured = operator.A(truth)  # [2, 3, H, W]
    prior = _prior()
    combined = predictor_corrector(prior, operator, measured, (2, *SHAPE), num_levels=20, generator=generator)
    assert combined.shape == (2, *SHAPE) and combined.imag.abs().max() == 0 and prior.nfe == 40  # one batch of 6
    zero_filled_rss = operator.AH(measured).abs()
    assert float((combined.real - zero_filled_rss).abs().mean()) > 0.1  # unmeasured coefficients were filled in


def test_real_images_stay_real():
    prior = _prior("real")
    operator = SingleCoilMRI(make_mask("gaussian1d", SHAPE, 4, center_fraction=0.125, seed=0))
    truth = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3)).to(torch.complex64)
    samples = dds(prior, operator, operator.A(truth), (2, *SHAPE), num_steps=10)
    assert samples.imag.abs().max() == 0


def test_posterior_spread_grows_with_acceleration():
    operator_measured = {}
    for acceleration in (2, 8):
        operator = SingleCoilMRI(make_mask("uniform1d", SHAPE, acceleration, center_fraction=0.125, seed=0))
        operator_measured[acceleration] = (operator, _measurement(operator)[:4])
    spreads = {}
    for acceleration, (operator, measured) in operator_measured.items():
        _, std = posterior_statistics(
            lambda g: dds(_prior(), operator, measured, (4, *SHAPE), num_steps=20, generator=g), 6
        )
        spreads[acceleration] = float(std.mean())
    # magnitudes compress the spread (measured ratio 1.12 for this white-noise prior; brain images differ more)
    assert spreads[8] > 1.05 * spreads[2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_type"):
        _prior("magnitude")
    with pytest.raises(ValueError, match="num_steps"):
        dds(
            _prior(),
            SingleCoilMRI(torch.ones(SHAPE, dtype=torch.bool)),
            torch.zeros(1, *SHAPE),
            (1, *SHAPE),
            num_steps=0,
        )
    with pytest.raises(ValueError, match="spacing_power"):
        _timesteps(_prior(), 50, 0.0)
