"""MRI physics: unitary FFT, adjoint operators, exact data consistency, conjugate gradient and masks that keep
the fraction they promise."""

from __future__ import annotations

import pytest
import torch

from medgen_common.mri import (
    MASK_KINDS,
    MultiCoilMRI,
    SingleCoilMRI,
    calibration_region,
    conjugate_gradient,
    estimate_coil_maps,
    fft2c,
    ifft2c,
    make_mask,
    root_sum_of_squares,
    sampling_fraction,
    synthetic_coil_maps,
)

SHAPE = (32, 32)


def _complex(*shape, seed=0, dtype=torch.complex128):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, generator=generator)


def _inner(a, b):
    return (a.conj() * b).sum()


def test_centred_fft_is_unitary_and_centred():
    image = _complex(2, *SHAPE)
    kspace = fft2c(image)
    torch.testing.assert_close(ifft2c(kspace), image)
    torch.testing.assert_close(kspace.abs().pow(2).sum(), image.abs().pow(2).sum())
    constant = torch.ones(SHAPE, dtype=torch.complex128)
    assert fft2c(constant).abs().argmax() == (SHAPE[0] // 2) * SHAPE[1] + SHAPE[1] // 2  # DC at the centre


@pytest.mark.parametrize("coils", [None, 6], ids=["single_coil", "multi_coil"])
def test_operators_are_adjoint(coils):
    mask = make_mask("poisson", SHAPE, 4, seed=1)
    operator = SingleCoilMRI(mask) if coils is None else MultiCoilMRI(mask, synthetic_coil_maps(SHAPE, coils).to(torch.complex128))
    image = _complex(*SHAPE, seed=2)
    kspace = _complex(*((coils,) if coils else ()), *SHAPE, seed=3)
    left, right = _inner(operator.A(image), kspace), _inner(image, operator.AH(kspace))
    assert abs(left - right) <= 1e-5 * abs(left)


def test_projection_is_exact_on_sampled_lines_and_idempotent():
    mask = make_mask("uniform1d", SHAPE, 4, seed=0)
    operator = SingleCoilMRI(mask)
    truth, guess = _complex(*SHAPE, seed=4), _complex(*SHAPE, seed=5)
    measured = operator.A(truth)
    projected = operator.project(guess, measured)
    torch.testing.assert_close(operator.A(projected), measured)  # A x = y exactly
    torch.testing.assert_close(fft2c(projected)[~mask], fft2c(guess)[~mask])  # unsampled k-space untouched
    torch.testing.assert_close(operator.project(projected, measured), projected)


def test_conjugate_gradient_lowers_the_data_residual_monotonically():
    mask = make_mask("poisson", SHAPE, 4, seed=2)
    operator = MultiCoilMRI(mask, synthetic_coil_maps(SHAPE, 4))
    truth = _complex(*SHAPE, seed=6, dtype=torch.complex64)
    measured = operator.A(truth)
    residuals = []
    for iterations in range(0, 12, 2):
        estimate = conjugate_gradient(operator.normal, operator.AH(measured), iterations=iterations)
        residuals.append(float((operator.A(estimate) - measured).abs().pow(2).sum().sqrt()))
    assert all(b < a for a, b in zip(residuals, residuals[1:]))
    assert residuals[-1] < 0.05 * residuals[0]
    # many more iterations than needed stay converged in float32 instead of blowing up
    settled = conjugate_gradient(operator.normal, operator.AH(measured), iterations=200)
    assert torch.isfinite(settled).all()
    assert float((operator.A(settled) - measured).abs().pow(2).sum().sqrt()) <= residuals[-1]


def test_conjugate_gradient_solves_a_batch_of_damped_systems():
    operator = SingleCoilMRI(make_mask("gaussian1d", SHAPE, 4, seed=3))
    rhs = _complex(3, *SHAPE, seed=7)
    solution = conjugate_gradient(operator.normal, rhs, iterations=30, damping=0.5)
    torch.testing.assert_close(operator.normal(solution) + 0.5 * solution, rhs)


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
@pytest.mark.parametrize("acceleration", [2, 4, 8])
def test_masks_keep_the_target_fraction_without_replacement_and_a_full_centre(kind, acceleration):
    mask = make_mask(kind, (64, 64), acceleration, center_fraction=0.08, seed=0)
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert sampling_fraction(mask) == pytest.approx(1 / acceleration, rel=0.03)
    assert mask[:, 30:34].all() if kind.endswith("1d") else mask[30:34, 30:34].all()
    if kind.endswith("1d"):
        assert (mask == mask[0]).all()  # whole columns
    assert torch.equal(mask, make_mask(kind, (64, 64), acceleration, center_fraction=0.08, seed=0))


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("radial", SHAPE, 4)
    with pytest.raises(ValueError, match="acceleration"):
        make_mask("uniform1d", SHAPE, 0.5)
    with pytest.raises(ValueError, match="centre"):
        make_mask("uniform1d", SHAPE, 8, center_fraction=0.3)


def test_coil_maps_combine_to_one_and_rss_recovers_the_magnitude():
    maps = synthetic_coil_maps(SHAPE, 8)
    torch.testing.assert_close(maps.abs().pow(2).sum(0), torch.ones(SHAPE))
    image = _complex(*SHAPE, seed=8, dtype=torch.complex64)
    torch.testing.assert_close(root_sum_of_squares(image * maps), image.abs())
    with pytest.raises(ValueError, match="sensitivity"):
        MultiCoilMRI(torch.ones(SHAPE, dtype=torch.bool), maps[:, :16])


@pytest.mark.parametrize("method, center_fraction", [("espirit", 0.4), ("acs_ratio", 0.25)])
def test_coil_maps_are_estimated_from_the_fully_sampled_centre(method, center_fraction):
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    inside = (rows**2 / 0.7 + cols**2 / 0.5) < 1
    image = inside * (1.0 + 0.3 * torch.cos(3 * rows)) * torch.exp(1j * (0.5 * cols))  # smooth object
    maps = synthetic_coil_maps(SHAPE, 8)
    mask = make_mask("uniform1d", SHAPE, 2, center_fraction=center_fraction, seed=0)
    rows_sampled, columns_sampled = calibration_region(mask)
    assert rows_sampled == 32 and columns_sampled >= round(32 * center_fraction) - 1  # 1D mask: every row
    estimate = estimate_coil_maps(fft2c(image * maps) * mask, mask, method=method)
    # sensitivities are defined up to a common phase: compare normalised correlations inside the object
    correlation = (estimate.conj() * maps).sum(0)[inside]
    assert float(correlation.abs().mean()) > (0.999 if method == "espirit" else 0.97)
    torch.testing.assert_close(estimate.abs().pow(2).sum(0)[inside], torch.ones(int(inside.sum())), atol=1e-4, rtol=0)


def test_coil_map_estimation_needs_a_calibration_region():
    maps = synthetic_coil_maps(SHAPE, 4)
    every_other_column = torch.zeros(SHAPE, dtype=torch.bool)
    every_other_column[:, ::2] = True
    with pytest.raises(ValueError, match="fully sampled k-space centre"):
        estimate_coil_maps(fft2c(maps) * every_other_column, every_other_column, method="acs_ratio")
    narrow = make_mask("uniform1d", SHAPE, 2, center_fraction=0.25, seed=0)
    with pytest.raises(ValueError, match="ESPIRiT needs .* 12 samples per side.*acs_ratio"):
        estimate_coil_maps(fft2c(maps) * narrow, narrow, method="espirit")
    with pytest.raises(ValueError, match="method"):
        estimate_coil_maps(fft2c(maps), torch.ones(SHAPE, dtype=torch.bool), method="walsh")
