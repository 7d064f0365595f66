"""MRI physics for reconstruction from undersampled k-space: one place for the Fourier transform, sampling masks,
forward operators, data consistency and conjugate gradient, used by every solver and by the demo data.

Conventions
- Images and k-space are complex tensors ``[..., H, W]`` (complex64 or complex128); coils on the axis before H.
- F is the centred orthonormal 2D DFT (MONAI's ``fftn_centered_t``: ifftshift, ``fft2(norm="ortho")``, fftshift),
  so F is unitary and ``A A^H`` = I on the sampled set of a binary mask.
- A mask is a bool tensor ``[H, W]``; 1D masks sample whole columns (phase encodes along the last axis), as the
  score-MRI and DDS code; every mask samples **without replacement** and :func:`sampling_fraction` reports what
  it really keeps.
- Operators: :class:`SingleCoilMRI` (A = M F) and :class:`MultiCoilMRI` (A = M F S, SENSE), each with ``A``,
  ``AH``, ``normal`` (A^H A) and ``project`` (nearest x with A x = y where that has a closed form).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from monai.networks.blocks.fft_utils_t import fftn_centered_t, ifftn_centered_t

__all__ = [
    "fft2c",
    "ifft2c",
    "complex_to_channels",
    "channels_to_complex",
    "MASK_KINDS",
    "make_mask",
    "sampling_fraction",
    "SingleCoilMRI",
    "MultiCoilMRI",
    "conjugate_gradient",
    "synthetic_coil_maps",
    "calibration_region",
    "estimate_coil_maps",
    "root_sum_of_squares",
]


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D DFT over the last two axes of a complex tensor."""
    return torch.view_as_complex(fftn_centered_t(torch.view_as_real(image.contiguous()), spatial_dims=2).contiguous())


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c`."""
    return torch.view_as_complex(ifftn_centered_t(torch.view_as_real(kspace.contiguous()), spatial_dims=2).contiguous())


def complex_to_channels(image: torch.Tensor) -> torch.Tensor:
    """Complex ``[B, H, W]`` -> real ``[B, 2, H, W]`` float32 (real, imaginary): the networks' layout."""
    return torch.view_as_real(image.contiguous()).permute(0, 3, 1, 2).float()


def channels_to_complex(channels: torch.Tensor) -> torch.Tensor:
    """Real ``[B, 2, H, W]`` (real, imaginary) -> complex ``[B, H, W]`` (complex64)."""
    return torch.complex(channels[:, 0].float(), channels[:, 1].float())


# ---------------------------------------------------------------------------------------------------------- masks


def _centre_block(size: int, fraction: float) -> slice:
    count = max(int(round(size * fraction)), 0)
    start = (size - count) // 2
    return slice(start, start + count)


def _uniform1d(shape, acceleration, center_fraction, rng) -> np.ndarray:
    height, width = shape
    mask = np.zeros(width, bool)
    mask[_centre_block(width, center_fraction)] = True
    target = int(round(width / acceleration))
    free = np.flatnonzero(~mask)
    mask[rng.choice(free, size=max(target - mask.sum(), 0), replace=False)] = True
    return np.broadcast_to(mask, (height, width)).copy()


def _gaussian1d(shape, acceleration, center_fraction, rng) -> np.ndarray:
    height, width = shape
    mask = np.zeros(width, bool)
    mask[_centre_block(width, center_fraction)] = True
    target = int(round(width / acceleration))
    columns = np.arange(width)
    weights = np.exp(-0.5 * ((columns - width / 2) / (width * 15 / 128)) ** 2) * ~mask  # score-MRI's spread
    count = min(max(target - mask.sum(), 0), int((weights > 0).sum()))
    mask[rng.choice(columns, size=count, replace=False, p=weights / weights.sum())] = True
    return np.broadcast_to(mask, (height, width)).copy()


def _gaussian2d(shape, acceleration, center_fraction, rng) -> np.ndarray:
    height, width = shape
    mask = np.zeros(shape, bool)
    mask[_centre_block(height, center_fraction), _centre_block(width, center_fraction)] = True
    rows, cols = np.mgrid[0:height, 0:width]
    sigma = 0.108 * np.array(shape)  # score-MRI's N(centre, size * 1.5 / 128 * size) per axis
    weights = np.exp(-0.5 * (((rows - height / 2) / sigma[0]) ** 2 + ((cols - width / 2) / sigma[1]) ** 2)) * ~mask
    count = min(max(int(round(height * width / acceleration)) - mask.sum(), 0), int((weights > 0).sum()))
    mask.flat[rng.choice(height * width, size=count, replace=False, p=(weights / weights.sum()).ravel())] = True
    return mask


def _poisson_disc(shape, radius_scale, rng, order) -> np.ndarray:
    """Variable-density Poisson disc: visit pixels in ``order`` and keep one when no kept pixel lies within its
    radius, which grows linearly with the normalised distance from the k-space centre."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width]
    distance = np.sqrt(((rows - height / 2) / (height / 2)) ** 2 + ((cols - width / 2) / (width / 2)) ** 2)
    radius = radius_scale * (0.5 + distance)
    mask = np.zeros(shape, bool)
    for flat in order:
        r, c = divmod(int(flat), width)
        reach = int(math.ceil(radius[r, c]))
        window = mask[max(r - reach, 0) : r + reach + 1, max(c - reach, 0) : c + reach + 1]
        if window.any():
            kept_r, kept_c = np.nonzero(window)
            gaps = np.hypot(kept_r + max(r - reach, 0) - r, kept_c + max(c - reach, 0) - c)
            if gaps.min() < radius[r, c]:
                continue
        mask[r, c] = True
    return mask


def _poisson(shape, acceleration, center_fraction, rng) -> np.ndarray:
    order = rng.permutation(shape[0] * shape[1])
    centre = np.zeros(shape, bool)
    centre[_centre_block(shape[0], center_fraction), _centre_block(shape[1], center_fraction)] = True
    target = 1.0 / acceleration
    low, high = 0.3, 8.0  # radius scale bracket (pixels): fraction falls as the scale grows
    for _ in range(14):
        scale = math.sqrt(low * high)
        fraction = (_poisson_disc(shape, scale, rng, order) | centre).mean()
        low, high = (scale, high) if fraction > target else (low, scale)
    return _poisson_disc(shape, math.sqrt(low * high), rng, order) | centre


MASK_KINDS: dict[str, Callable] = {
    "uniform1d": _uniform1d,
    "gaussian1d": _gaussian1d,
    "gaussian2d": _gaussian2d,
    "poisson": _poisson,
}


def make_mask(
    kind: str, shape: tuple[int, int], acceleration: float, center_fraction: float = 0.08, seed: int = 0
) -> torch.Tensor:
    """A Cartesian sampling mask ``[H, W]`` (bool) keeping about ``1 / acceleration`` of k-space, without
    replacement, always with a fully sampled centre of ``center_fraction`` of each sampled axis (columns for the
    1D kinds, a square block for the 2D kinds).

    kind: ``"uniform1d"`` (random columns), ``"gaussian1d"`` (columns ~ N(centre, (15/128 W)^2)), ``"gaussian2d"``
    (points ~ 2D Gaussian, sigma 0.108 of each side) or ``"poisson"`` (variable-density Poisson disc).

    Raises:
        ValueError: unknown kind, acceleration < 1, or a centre fraction outside [0, 1).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {sorted(MASK_KINDS)}.")
    if not acceleration >= 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration!r}.")
    if not 0 <= center_fraction < 1:
        raise ValueError(f"center_fraction must be in [0, 1), got {center_fraction!r}.")
    if center_fraction * (1 if kind.endswith("1d") else center_fraction) > 1 / acceleration:
        raise ValueError(f"the fully sampled centre ({center_fraction}) alone exceeds 1 / acceleration ({1 / acceleration:.3f}).")
    return torch.from_numpy(MASK_KINDS[kind](tuple(shape), acceleration, center_fraction, np.random.default_rng(seed)))


def sampling_fraction(mask: torch.Tensor) -> float:
    """Fraction of k-space samples a mask keeps (1 / the effective acceleration)."""
    return float(mask.float().mean())


# ------------------------------------------------------------------------------------------------------ operators


class SingleCoilMRI:
    """A = M F on complex images ``[..., H, W]``; ``y = A x`` keeps the full k-space grid with zeros where
    unsampled, so ``AH(y)`` is the zero-filled reconstruction."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.bool()

    def A(self, image: torch.Tensor) -> torch.Tensor:
        return fft2c(image) * self.mask.to(image.device)

    def AH(self, kspace: torch.Tensor) -> torch.Tensor:
        return ifft2c(kspace * self.mask.to(kspace.device))

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        return self.AH(self.A(image))

    def project(self, image: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        """Exact data consistency (chapter Eq. 7.27): F^-1((1 - M) F x + M y), the nearest image with A x = y."""
        kspace = fft2c(image)
        mask = self.mask.to(image.device)
        return ifft2c(torch.where(mask, measured, kspace))


class MultiCoilMRI:
    """SENSE: A x = M F (S_k x) per coil, A^H y = sum_k conj(S_k) F^-1(M y_k).

    Args:
        mask: ``[H, W]`` bool.
        sensitivity: coil maps ``[C, H, W]`` complex (normalised so sum_k |S_k|^2 = 1 inside the object).
    """

    def __init__(self, mask: torch.Tensor, sensitivity: torch.Tensor):
        if sensitivity.ndim != 3 or sensitivity.shape[-2:] != mask.shape:
            raise ValueError(f"sensitivity must be [C, H, W] with H, W of the mask {tuple(mask.shape)}, got {tuple(sensitivity.shape)}.")
        self.mask, self.sensitivity = mask.bool(), sensitivity

    def A(self, image: torch.Tensor) -> torch.Tensor:
        """``[..., H, W]`` -> ``[..., C, H, W]``."""
        return fft2c(image.unsqueeze(-3) * self.sensitivity.to(image.device)) * self.mask.to(image.device)

    def AH(self, kspace: torch.Tensor) -> torch.Tensor:
        """``[..., C, H, W]`` -> ``[..., H, W]``."""
        coils = ifft2c(kspace * self.mask.to(kspace.device))
        return (coils * self.sensitivity.to(kspace.device).conj()).sum(-3)

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        return self.AH(self.A(image))


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hermitian inner product <a, b> = sum conj(a) b over the last two axes, accumulated in double precision."""
    return (a.conj().to(torch.complex128) * b.to(torch.complex128)).sum((-2, -1))


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, initial: torch.Tensor | None = None,
    iterations: int = 10, tolerance: float = 1e-10, damping: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Solve ``(N + damping I) x = rhs`` for a Hermitian positive semi-definite ``N`` (e.g. A^H A) by conjugate
    gradient with complex (Hermitian) inner products, batched over the leading axes of ``rhs [..., H, W]``.

    Inner products are accumulated in double precision and a batch element stops updating once its squared
    residual falls below ``tolerance`` times the initial one (float32 CG otherwise diverges after convergence on
    projection-like operators).
    """

    def apply(x):
        return normal(x) + damping * x if damping else normal(x)

    x = torch.zeros_like(rhs) if initial is None else initial.clone()
    residual = rhs - apply(x)
    direction = residual.clone()
    residual_norm = _inner(residual, residual).real
    floor = tolerance * residual_norm.clamp_min(1e-300)
    for _ in range(iterations):
        active = residual_norm > floor
        if not active.any():
            break
        step_image = apply(direction)
        curvature = _inner(direction, step_image).real
        alpha = torch.where(active, residual_norm / curvature.clamp_min(1e-300), torch.zeros_like(residual_norm))
        alpha = alpha.to(rhs.real.dtype)[..., None, None]
        x = x + alpha * direction
        residual = residual - alpha * step_image
        new_norm = _inner(residual, residual).real
        beta = torch.where(active, new_norm / residual_norm.clamp_min(1e-300), torch.zeros_like(new_norm))
        direction = residual + beta.to(rhs.real.dtype)[..., None, None] * direction
        residual_norm = torch.where(active, new_norm, residual_norm)
    return x


def synthetic_coil_maps(shape: tuple[int, int], num_coils: int = 8, radius: float = 1.5) -> torch.Tensor:
    """Smooth complex coil sensitivities ``[C, H, W]`` (complex64) of ``num_coils`` coils on a ring of ``radius``
    (in units of the half field of view) around the object, each with a linear phase, normalised so that
    sum_k |S_k|^2 = 1 at every pixel (an ideal SENSE combination)."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width]
    y, x = (rows - height / 2) / (height / 2), (cols - width / 2) / (width / 2)
    maps = []
    for k in range(num_coils):
        angle = 2 * math.pi * k / num_coils
        distance = np.hypot(x - radius * math.cos(angle), y - radius * math.sin(angle))
        phase = math.pi * (x * math.cos(angle) + y * math.sin(angle)) / 2
        maps.append(np.exp(1j * phase) / distance**2)
    maps = np.stack(maps)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return torch.from_numpy(maps.astype(np.complex64))


def calibration_region(mask: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of the largest fully sampled block centred on the k-space centre of ``mask [H, W]``."""
    centre_row, centre_col = mask.shape[0] // 2, mask.shape[1] // 2
    sizes = []
    for line in (mask[:, centre_col], mask[centre_row, :]):
        centre, low = len(line) // 2, len(line) // 2
        while low > 0 and line[low - 1]:
            low -= 1
        high = centre
        while high < len(line) and line[high]:
            high += 1
        sizes.append(min(centre - low, high - centre) * 2)
    return sizes[0], sizes[1]


def _calibration_block(kspace: torch.Tensor, mask: torch.Tensor, largest: int) -> torch.Tensor:
    """The fully sampled centre of ``kspace [C, H, W]`` (at most ``largest`` samples per side)."""
    rows, cols = (min(size, largest) for size in calibration_region(mask))
    if min(rows, cols) < 4:
        raise ValueError(f"coil maps need a fully sampled k-space centre of >= 4 x 4 samples; this mask has {rows} x {cols}.")
    top, left = mask.shape[0] // 2 - rows // 2, mask.shape[1] // 2 - cols // 2
    return kspace[:, top : top + rows, left : left + cols]


def _espirit(calibration: torch.Tensor, shape: tuple[int, int], kernel_width: int, threshold: float, crop: float,
             iterations: int = 50) -> torch.Tensor:  # fmt: skip
    """ESPIRiT (Uecker et al. 2014) from a calibration block ``[C, h, w]``: the k-space kernels spanning the row space
    of the block-Hankel calibration matrix (singular values >= ``threshold`` x the largest), their image-space
    Gram matrix per pixel, and its leading eigenvector (power iteration), kept where the eigenvalue is > ``crop``."""
    coils = calibration.shape[0]
    width = min(kernel_width, *calibration.shape[1:])
    blocks = calibration.unfold(1, width, 1).unfold(2, width, 1)  # [C, nh, nw, k, k]
    matrix = blocks.permute(1, 2, 0, 3, 4).reshape(-1, coils * width * width).to(torch.complex128)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    kernels = vh[singular >= threshold * singular.max()].reshape(-1, coils, width, width)
    padded = kernels.new_zeros(kernels.shape[0], coils, *shape)
    top, left = shape[0] // 2 - width // 2, shape[1] // 2 - width // 2
    padded[..., top : top + width, left : left + width] = kernels
    image_kernels = ifft2c(padded).permute(2, 3, 1, 0)  # [H, W, C, n]
    gram = image_kernels @ image_kernels.conj().transpose(-1, -2) * (shape[0] * shape[1] / width**2)  # [H, W, C, C]
    vectors = torch.ones(*shape, coils, 1, dtype=gram.dtype)
    for _ in range(iterations):
        vectors = gram @ vectors
        eigenvalue = vectors.norm(dim=-2, keepdim=True)
        vectors = vectors / eigenvalue.clamp_min(1e-30)
    maps = vectors[..., 0].permute(2, 0, 1)  # [C, H, W]
    maps = maps * torch.exp(-1j * maps[0].angle())  # phase relative to the first coil
    return (maps * (eigenvalue[..., 0, 0] > crop)).to(torch.complex64)


def estimate_coil_maps(kspace: torch.Tensor, mask: torch.Tensor, method: str = "espirit", kernel_width: int = 6,
                       calibration_width: int = 24, threshold: float = 0.02, crop: float = 0.95) -> torch.Tensor:  # fmt: skip
    """Coil sensitivities ``[C, H, W]`` from measured multi-coil k-space ``[C, H, W]`` and its ``mask``, from the fully
    sampled centre (``calibration_region``, at most ``calibration_width`` per side).

    ``method="espirit"``: ESPIRiT with ``kernel_width`` kernels, singular-value ``threshold`` and eigenvalue ``crop``
    (sigpy's ``EspiritCalib`` defaults); maps are zero where no eigenvalue exceeds ``crop`` (outside the object's
    support). It needs a calibration region of at least 2 x ``kernel_width`` per side. ``method="acs_ratio"``:
    Hann-windowed low-resolution coil images over their root sum of squares, zero where that is below ``threshold``
    x its maximum; these maps carry the object's low-resolution phase, so the combined image is nearly real. Both
    give sum_k |S_k|^2 = 1 where non-zero.

    Raises:
        ValueError: an unknown method, no fully sampled centre of at least 4 x 4 samples, or (``"espirit"``) one
            too small for ESPIRiT.
    """
    if method not in ("espirit", "acs_ratio"):
        raise ValueError(f"method must be 'espirit' or 'acs_ratio', got {method!r}.")
    if method == "espirit" and min(calibration_region(mask)) < 2 * kernel_width:
        raise ValueError(f"ESPIRiT needs a fully sampled centre of >= {2 * kernel_width} samples per side; this mask "
                         f"has {calibration_region(mask)}: sample more calibration lines or use method='acs_ratio'.")  # fmt: skip
    if method == "espirit":
        calibration = _calibration_block(kspace, mask, calibration_width)
        return _espirit(calibration, tuple(mask.shape), kernel_width, threshold, crop).to(kspace.device)
    rows, cols = _calibration_block(kspace, mask, max(mask.shape)).shape[-2:]
    window = torch.zeros(mask.shape, dtype=torch.float32)
    top, left = mask.shape[0] // 2 - rows // 2, mask.shape[1] // 2 - cols // 2
    window[top : top + rows, left : left + cols] = torch.outer(torch.hann_window(rows, periodic=False),
                                                              torch.hann_window(cols, periodic=False))  # fmt: skip
    coil_images = ifft2c(kspace * window.to(kspace.device))
    rss = root_sum_of_squares(coil_images)
    inside = rss > threshold * rss.max()
    return torch.where(inside, coil_images / rss.clamp_min(1e-12), torch.zeros_like(coil_images))


def root_sum_of_squares(coil_images: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_k |x_k|^2) over the coil axis of ``[..., C, H, W]`` (Alg. 7.2's combination)."""
    return torch.sqrt((coil_images.abs() ** 2).sum(-3))
