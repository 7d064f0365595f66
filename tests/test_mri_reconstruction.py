"""The reconstruction report: every method under every protocol, hard data consistency for the diffusion solvers,
and the posterior spread by acceleration; with a white-Gaussian oracle prior so no training is needed."""

from __future__ import annotations

import json

import torch
from monai.networks.schedulers import DDPMScheduler

from medgen_common.mri_reconstruction import mri_report, simulate_measurement
from medgen_common.posterior_sampling import DiffusionPrior
from test_posterior_sampling import GaussianOracle


def _images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    disc = ((rows**2 + cols**2) < 0.6).float()
    return torch.stack([disc * (0.5 + 0.5 * torch.rand((), generator=generator)) for _ in range(count)]).to(torch.complex64)


def test_report_scores_every_method_and_keeps_hard_data_consistency(tmp_path):
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod
    prior = DiffusionPrior(GaussianOracle(alphas_cumprod), alphas_cumprod, "complex")
    protocols = {"uniform_x4": {"mask_kind": "uniform1d", "acceleration": 4, "center_fraction": 0.125}}
    solvers = {"dds": {"num_steps": 10}, "pc": {"num_levels": 10}}
    report = mri_report(prior, _images(3, 0), _images(2, 1), protocols, solvers, tmp_path, cs_weights=[1e-3, 1e-2],
                        cs_iterations=20, uncertainty_accelerations=[2, 8], num_posterior_samples=2)  # fmt: skip
    assert json.loads((tmp_path / "report.json").read_text()) == report
    entry = report["protocols"]["uniform_x4"]
    assert abs(entry["sampling_fraction"] - 0.25) < 0.01
    assert set(entry["methods"]) == {"zero_filled", "tv", "l1_wavelet", "dds", "pc"}
    assert entry["methods"]["dds"]["nfe"] == 10 and entry["methods"]["pc"]["nfe"] == 20
    assert entry["methods"]["dds"]["data_residual"] < 1e-3 and entry["methods"]["pc"]["data_residual"] < 1e-3
    assert entry["methods"]["tv"]["weight"] in (1e-3, 1e-2)
    assert set(report["posterior_std_by_acceleration"]["mean_std"]) == {"2", "8"}


def test_measurement_is_multi_coil_when_asked():
    operator, measured = simulate_measurement(_images(2, 0), {"mask_kind": "poisson", "acceleration": 4}, num_coils=4)
    assert measured.shape == (2, 4, 16, 16) and operator.sensitivity.shape == (4, 16, 16)
