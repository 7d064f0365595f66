"""Classical compressed-sensing baselines for undersampled MRI, in torch on the operators of ``medgen_common.mri``:
zero-filled, total variation (the chapter's "TV") and L1-wavelet (orthonormal periodic Daubechies db4 by default),
with the regularisation weight tuned on validation slices. Batched over ``[B, H, W]`` complex images; every operator
here has norm <= 1 (unitary F, binary mask, coil maps with sum |S_k|^2 <= 1), which fixes the step sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "zero_filled",
    "WAVELET_FILTERS",
    "wavelet_matrix",
    "wavelet_forward",
    "wavelet_inverse",
    "wavelet_levels",
    "tv_reconstruction",
    "l1_wavelet_reconstruction",
    "tune_regularisation",
]


def zero_filled(operator, measured: torch.Tensor) -> torch.Tensor:
    """A^H y: the aliased zero-filled image."""
    return operator.AH(measured)


# Orthonormal Daubechies scaling (low-pass) filters; "db4" has 4 vanishing moments and 8 taps (sigpy's and the
# spec's default), "haar" is db1.
WAVELET_FILTERS = {
    "haar": (0.7071067811865476, 0.7071067811865476),
    "db4": (0.23037781330885523, 0.7148465705525415, 0.6308807679295904, -0.02798376941698385,
            -0.18703481171888114, 0.030841381835986965, 0.032883011666982945, -0.010597401784997278),
}  # fmt: skip


@functools.lru_cache(maxsize=32)
def wavelet_matrix(size: int, wavelet: str = "db4") -> torch.Tensor:
    """The ``[size, size]`` orthogonal matrix of one periodic DWT level: rows 0..size/2-1 the low-pass outputs,
    then the high-pass ones (g[n] = (-1)^n h[L-1-n]), each filter shifted by two samples per row."""
    if wavelet not in WAVELET_FILTERS:
        raise ValueError(f"unknown wavelet {wavelet!r}; choose from {sorted(WAVELET_FILTERS)}.")
    low = torch.tensor(WAVELET_FILTERS[wavelet], dtype=torch.float64)
    high = torch.tensor([(-1) ** n for n in range(len(low))], dtype=torch.float64) * low.flip(0)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for row in range(size // 2):
        for tap in range(len(low)):
            matrix[row, (2 * row + tap) % size] += low[tap]
            matrix[size // 2 + row, (2 * row + tap) % size] += high[tap]
    return matrix


def wavelet_forward(image: torch.Tensor, levels: int, wavelet: str = "db4") -> torch.Tensor:
    """Orthonormal periodic 2D DWT of ``[..., H, W]`` in place of the pixels (Mallat layout: the coarsest
    approximation in the top-left ``H / 2**levels x W / 2**levels`` block, details elsewhere).

    Raises:
        ValueError: a side not divisible by 2**levels, or too short for the filter at the coarsest level.
    """
    height, width = image.shape[-2:]
    factor = 2**levels
    if height % factor or width % factor or min(height, width) // 2 ** (levels - 1) < len(WAVELET_FILTERS[wavelet]):
        raise ValueError(f"image sides {(height, width)} must be divisible by 2**levels = {factor} and leave at least "
                         f"{len(WAVELET_FILTERS[wavelet])} samples at the coarsest level.")  # fmt: skip
    out = image.clone()
    for level in range(levels):
        h, w = height >> level, width >> level
        rows, cols = (wavelet_matrix(n, wavelet).to(image.device, image.dtype) for n in (h, w))
        out[..., :h, :w] = rows @ out[..., :h, :w] @ cols.T
    return out


def wavelet_inverse(coefficients: torch.Tensor, levels: int, wavelet: str = "db4") -> torch.Tensor:
    """Inverse of :func:`wavelet_forward` (its transpose)."""
    height, width = coefficients.shape[-2:]
    out = coefficients.clone()
    for level in reversed(range(levels)):
        h, w = height >> level, width >> level
        rows, cols = (wavelet_matrix(n, wavelet).to(coefficients.device, coefficients.dtype) for n in (h, w))
        out[..., :h, :w] = rows.T @ out[..., :h, :w] @ cols
    return out


def _soft_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Complex soft thresholding: shrink the magnitude by ``threshold``, keep the phase."""
    return x * torch.clamp(1.0 - threshold / x.abs().clamp_min(1e-12), min=0.0)


def wavelet_levels(shape: Sequence[int], wavelet: str = "db4", most: int = 3) -> int:
    """The most levels (<= ``most``) :func:`wavelet_forward` accepts for an image of ``shape`` (H, W); >= 1."""
    height, width = shape
    for levels in range(most, 0, -1):
        divisible = not height % 2**levels and not width % 2**levels
        if divisible and min(height, width) // 2 ** (levels - 1) >= len(WAVELET_FILTERS[wavelet]):
            return levels
    raise ValueError(f"image sides {tuple(shape)} are too small or odd for a {wavelet} wavelet level.")


def l1_wavelet_reconstruction(operator, measured: torch.Tensor, weight: float, iterations: int = 200,
                              levels: int | None = None, wavelet: str = "db4") -> torch.Tensor:  # fmt: skip
    """argmin_x 1/2 ||A x - y||^2 + weight ||W x||_1 (detail coefficients of an orthonormal ``wavelet``, ``levels``
    levels, default the most up to 3 that the image size allows) by FISTA with step 1, from A^H y."""
    x = previous = zero_filled(operator, measured)
    height, width = x.shape[-2:]
    levels = wavelet_levels((height, width), wavelet) if levels is None else levels
    approximation = (slice(None),) * (x.ndim - 2) + (slice(0, height >> levels), slice(0, width >> levels))
    momentum = 1.0
    for _ in range(iterations):
        next_momentum = (1.0 + (1.0 + 4.0 * momentum**2) ** 0.5) / 2.0
        z = x + (momentum - 1.0) / next_momentum * (x - previous)
        coefficients = wavelet_forward(z - operator.AH(operator.A(z) - measured), levels, wavelet)
        shrunk = _soft_threshold(coefficients, weight)
        shrunk[approximation] = coefficients[approximation]
        previous, x, momentum = x, wavelet_inverse(shrunk, levels, wavelet), next_momentum
    return x


def _gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences ``[2, ..., H, W]`` (zero at the far border)."""
    dy, dx = torch.zeros_like(x), torch.zeros_like(x)
    dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return torch.stack([dy, dx])


def _divergence(q: torch.Tensor) -> torch.Tensor:
    """Negative adjoint of :func:`_gradient`."""
    qy, qx = q
    div = torch.zeros_like(qy)
    div[..., :-1, :] += qy[..., :-1, :]
    div[..., 1:, :] -= qy[..., :-1, :]
    div[..., :, :-1] += qx[..., :, :-1]
    div[..., :, 1:] -= qx[..., :, :-1]
    return div


def tv_reconstruction(operator, measured: torch.Tensor, weight: float, iterations: int = 300) -> torch.Tensor:
    """argmin_x 1/2 ||A x - y||^2 + weight TV(x) (isotropic, complex) by Chambolle-Pock primal-dual iterations
    on K = [A; grad] with ||K||^2 <= 9, from A^H y."""
    x = zero_filled(operator, measured)
    x_bar, data_dual, gradient_dual = x.clone(), torch.zeros_like(measured), torch.zeros_like(_gradient(x))
    step = 1.0 / 3.0  # tau = sigma = 1 / ||K||
    for _ in range(iterations):
        data_dual = (data_dual + step * (operator.A(x_bar) - measured)) / (1.0 + step)
        gradient_dual = gradient_dual + step * _gradient(x_bar)
        magnitude = gradient_dual.abs().pow(2).sum(0).sqrt()
        gradient_dual = gradient_dual / torch.clamp(magnitude / weight, min=1.0) if weight > 0 else torch.zeros_like(gradient_dual)
        updated = x - step * (operator.AH(data_dual) - _divergence(gradient_dual))
        x_bar, x = 2.0 * updated - x, updated
    return x


def tune_regularisation(
    reconstruct: Callable[[float], torch.Tensor], truth: torch.Tensor, weights: Sequence[float],
    score: Callable[[torch.Tensor, torch.Tensor], float],
) -> tuple[float, dict[float, float]]:  # fmt: skip
    """Pick the weight whose reconstruction ``reconstruct(weight)`` scores best against ``truth`` (e.g. mean PSNR
    of the magnitudes on validation slices). Returns the best weight and every weight's score."""
    if not weights:
        raise ValueError("give at least one regularisation weight to try.")
    scores = {float(weight): float(score(reconstruct(weight), truth)) for weight in weights}
    return max(scores, key=scores.get), scores
