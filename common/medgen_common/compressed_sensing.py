"""Classical compressed-sensing baselines for undersampled MRI, in torch on the operators of ``medgen_common.mri``:
zero-filled, total variation (the chapter's "TV") and L1-wavelet, with the regularisation weight tuned on
validation slices. Batched over ``[B, H, W]`` complex images; every operator here has norm <= 1 (unitary F, binary
mask, coil maps with sum |S_k|^2 <= 1), which fixes the step sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "zero_filled",
    "haar_forward",
    "haar_inverse",
    "tv_reconstruction",
    "l1_wavelet_reconstruction",
    "tune_regularisation",
]


def zero_filled(operator, measured: torch.Tensor) -> torch.Tensor:
    """A^H y: the aliased zero-filled image."""
    return operator.AH(measured)


def _haar_level(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x[..., ::2, ::2], x[..., ::2, 1::2], x[..., 1::2, ::2], x[..., 1::2, 1::2]
    return torch.stack([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d]) / 2


def _inverse_haar_level(bands: torch.Tensor) -> torch.Tensor:
    low, horizontal, vertical, diagonal = bands
    height, width = low.shape[-2:]
    x = low.new_zeros(*low.shape[:-2], 2 * height, 2 * width)
    x[..., ::2, ::2] = (low + horizontal + vertical + diagonal) / 2
    x[..., ::2, 1::2] = (low - horizontal + vertical - diagonal) / 2
    x[..., 1::2, ::2] = (low + horizontal - vertical - diagonal) / 2
    x[..., 1::2, 1::2] = (low - horizontal - vertical + diagonal) / 2
    return x


def haar_forward(image: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Orthonormal 2D Haar transform of ``[..., H, W]`` (H, W divisible by 2**levels): the detail bands
    ``[3, ..., h, w]`` of each level, finest first, then the coarsest approximation ``[..., h, w]``."""
    factor = 2**levels
    if image.shape[-2] % factor or image.shape[-1] % factor:
        raise ValueError(f"image sides must be divisible by 2**levels = {factor}, got {tuple(image.shape[-2:])}.")
    coefficients, low = [], image
    for _ in range(levels):
        bands = _haar_level(low)
        coefficients.append(bands[1:])
        low = bands[0]
    return coefficients + [low]


def haar_inverse(coefficients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`haar_forward`."""
    low = coefficients[-1]
    for details in reversed(coefficients[:-1]):
        low = _inverse_haar_level(torch.cat([low[None], details]))
    return low


def _soft_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Complex soft thresholding: shrink the magnitude by ``threshold``, keep the phase."""
    return x * torch.clamp(1.0 - threshold / x.abs().clamp_min(1e-12), min=0.0)


def l1_wavelet_reconstruction(operator, measured: torch.Tensor, weight: float, iterations: int = 200,
                              levels: int = 3) -> torch.Tensor:  # fmt: skip
    """argmin_x 1/2 ||A x - y||^2 + weight ||W x||_1 (Haar details only) by FISTA with step 1, from A^H y."""
    x = previous = zero_filled(operator, measured)
    momentum = 1.0
    for _ in range(iterations):
        next_momentum = (1.0 + (1.0 + 4.0 * momentum**2) ** 0.5) / 2.0
        z = x + (momentum - 1.0) / next_momentum * (x - previous)
        gradient_step = z - operator.AH(operator.A(z) - measured)
        coefficients = haar_forward(gradient_step, levels)
        shrunk = [_soft_threshold(band, weight) for band in coefficients[:-1]] + [coefficients[-1]]
        previous, x, momentum = x, haar_inverse(shrunk), next_momentum
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
