"""Compressed-sensing baselines: an orthonormal wavelet, and TV / L1-wavelet reconstructions that beat zero-filling
on a piecewise-constant phantom with a tuned weight."""

from __future__ import annotations

import pytest
import torch

from medgen_common.compressed_sensing import (
    wavelet_forward,
    wavelet_inverse,
    wavelet_levels,
    l1_wavelet_reconstruction,
    tune_regularisation,
    tv_reconstruction,
    zero_filled,
)
from medgen_common.mri import SingleCoilMRI, make_mask


def _phantom() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    image = ((rows / 0.8) ** 2 + (cols / 0.6) ** 2 < 1).float() * 0.6
    image += ((rows - 0.2) ** 2 + (cols + 0.1) ** 2 < 0.08).float() * 0.4
    image[8:12, 18:24] = 1.0
    return image.to(torch.complex64)[None]


def _blocks() -> torch.Tensor:
    """Piecewise constant on a dyadic 4-pixel grid: exactly sparse in the Haar basis."""
    generator = torch.Generator().manual_seed(1)
    coarse = (torch.rand(8, 8, generator=generator) > 0.6).float() * torch.rand(8, 8, generator=generator)
    return coarse.repeat_interleave(4, 0).repeat_interleave(4, 1).to(torch.complex64)[None]


def _psnr(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    mse = (estimate.abs() - truth.abs()).pow(2).mean()
    return float(10 * torch.log10(truth.abs().max() ** 2 / mse))


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
def test_wavelets_are_orthonormal(wavelet):
    image = torch.randn(2, 32, 64, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    coefficients = wavelet_forward(image, 2, wavelet)
    torch.testing.assert_close(wavelet_inverse(coefficients, 2, wavelet), image)
    torch.testing.assert_close(coefficients.abs().pow(2).sum(), image.abs().pow(2).sum())
    # details of a polynomial the wavelet annihilates vanish away from the periodic wrap (db4: 4 vanishing
    # moments, Haar: 1)
    degree = 3 if wavelet == "db4" else 0
    polynomial = (torch.arange(32, dtype=torch.float64) ** degree)[:, None].expand(32, 64).to(torch.complex128)
    details = wavelet_forward(polynomial, 1, wavelet)[16:, :32]  # vertical details
    assert details[:12].abs().max() < 1e-6 * polynomial.abs().max()
    with pytest.raises(ValueError, match="divisible"):
        wavelet_forward(image, 6, wavelet)


def test_wavelet_levels_fit_the_image():
    assert wavelet_levels((64, 64)) == 3 and wavelet_levels((16, 16)) == 2 and wavelet_levels((16, 16), "haar") == 3
    assert wavelet_levels((56, 72)) == 3 and wavelet_levels((20, 32)) == 2 and wavelet_levels((12, 16)) == 1
    with pytest.raises(ValueError, match="too small"):
        wavelet_levels((6, 6))


def test_tuned_tv_beats_zero_filling():
    truth = _phantom()
    operator = SingleCoilMRI(make_mask("uniform1d", (32, 32), 4, center_fraction=0.125, seed=0))
    measured = operator.A(truth)
    weights = [1e-3, 1e-2, 3e-2, 1e-1]
    best, scores = tune_regularisation(lambda w: tv_reconstruction(operator, measured, w), truth, weights, _psnr)
    assert scores[best] == max(scores.values())
    assert scores[best] > _psnr(zero_filled(operator, measured), truth) + 3.0


def test_l1_wavelet_recovers_a_haar_sparse_image():
    truth = _blocks()
    operator = SingleCoilMRI(make_mask("poisson", (32, 32), 3, center_fraction=0.125, seed=0))
    measured = operator.A(truth)
    estimate = l1_wavelet_reconstruction(operator, measured, 1e-3, iterations=300, levels=3, wavelet="haar")
    assert _psnr(estimate, truth) > _psnr(zero_filled(operator, measured), truth) + 5.0


def test_tv_without_weight_fits_the_data():
    truth = _phantom()
    operator = SingleCoilMRI(make_mask("poisson", (32, 32), 2, center_fraction=0.25, seed=0))
    measured = operator.A(truth)
    estimate = tv_reconstruction(operator, measured, 0.0, iterations=200)
    assert (operator.A(estimate) - measured).abs().norm() < 1e-3 * measured.abs().norm()
