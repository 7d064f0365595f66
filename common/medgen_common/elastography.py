"""Strain-elastography colour coding: the 64-level jet bar, encoding and decoding of strain.

Convention (elastography spec section 7.2, the orientation of the authors' colour bar): palette index 0 is dark
blue = hard (low strain), 63 is dark red = soft (high strain). Strain is shown relative to the image's mean strain
(the auto-normalised display of strain elastography), on a log2 scale covering 1/4 to 4:

    index = round(63 (log2(strain_rel) + 2) / 4), clipped to [0, 63];   strain_rel = 2 ** (4 index / 63 - 2).

RGB images are channel-first float arrays in [0, 1] (``(3, H, W)`` or ``(B, 3, H, W)``); the networks see them
scaled to [-1, 1].

Also here, for the V-EUS GAN (chapter 8):
- :class:`ColourPrior`: the colour-rebalancing weights of the L1 loss (Eq. 8.1), gamma = (alpha p + (1 - alpha) /
  Q) ** -1 over quantised CIE Lab ab bins of the training elastograms (Zhang et al.'s colourisation trick);
- :func:`lesion_boxes` and :func:`crop_boxes`: the tumour discriminator's input, a square box around each lesion
  resized to a fixed size (differentiable, so batches > 1 work).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .writers import write_json

__all__ = [
    "NUM_LEVELS",
    "JET_PALETTE",
    "strain_to_index",
    "index_to_strain",
    "index_to_rgb",
    "rgb_to_index",
    "lesion_ring",
    "strain_ratio",
    "rgb_to_lab",
    "ColourPrior",
    "lesion_boxes",
    "crop_boxes",
]

NUM_LEVELS = 64
_LOG2_RANGE = (-2.0, 2.0)  # strain_rel from 1/4 to 4


def _jet(levels: int) -> np.ndarray:
    """Piecewise-linear jet of ``levels`` entries, dark blue -> blue -> cyan -> yellow -> red -> dark red."""
    t = (np.arange(levels) + 0.5) / levels
    channels = [np.clip(1.5 - np.abs(4.0 * t - centre), 0.0, 1.0) for centre in (3.0, 2.0, 1.0)]
    return np.stack(channels, axis=1)


JET_PALETTE = _jet(NUM_LEVELS)  # (64, 3) float64 RGB in [0, 1]; row 0 dark blue (hard), row 63 dark red (soft)


def strain_to_index(strain_rel: np.ndarray) -> np.ndarray:
    """Palette index (int64, 0-63) of a relative strain map (strain / mean strain, > 0)."""
    strain_rel = np.asarray(strain_rel, dtype=np.float64)
    if not np.all(np.isfinite(strain_rel)) or np.any(strain_rel <= 0):
        raise ValueError("strain_rel must be finite and > 0 everywhere.")
    low, high = _LOG2_RANGE
    index = np.round((NUM_LEVELS - 1) * (np.log2(strain_rel) - low) / (high - low))
    return np.clip(index, 0, NUM_LEVELS - 1).astype(np.int64)


def index_to_strain(index: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Relative strain 2 ** (4 index / 63 - 2) of palette indices (numpy or torch, float)."""
    low, high = _LOG2_RANGE
    exponent = low + (high - low) * index / (NUM_LEVELS - 1)
    return torch.exp2(exponent.float()) if isinstance(index, torch.Tensor) else np.exp2(exponent)


def index_to_rgb(index: np.ndarray) -> np.ndarray:
    """RGB image (3, *index.shape), float32 in [0, 1], of a palette-index map (integers 0-63)."""
    index = np.asarray(index)
    if index.size and (index.min() < 0 or index.max() >= NUM_LEVELS or not np.issubdtype(index.dtype, np.integer)):
        raise ValueError(f"index must hold integers in [0, {NUM_LEVELS - 1}], got {index.dtype} in "
                         f"[{index.min()}, {index.max()}].")  # fmt: skip
    return np.moveaxis(JET_PALETTE[index], -1, 0).astype(np.float32)


def rgb_to_index(rgb: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Nearest palette entry (L1 distance in RGB, as the authors' decoder) of each pixel.

    rgb: ``(3, H, W)`` or ``(B, 3, H, W)`` in [0, 1], numpy or torch. Returns int64 indices ``(H, W)`` or
    ``(B, H, W)`` of the same array type.
    """
    is_tensor = isinstance(rgb, torch.Tensor)
    values = rgb.detach().float().cpu() if is_tensor else torch.as_tensor(np.asarray(rgb, dtype=np.float32))
    if values.ndim not in (3, 4) or values.shape[-3] != 3:
        raise ValueError(f"rgb must be (3, H, W) or (B, 3, H, W), got shape {tuple(values.shape)}.")
    palette = torch.as_tensor(JET_PALETTE, dtype=torch.float32)  # (64, 3)
    pixels = values.movedim(-3, -1).unsqueeze(-2)  # (..., H, W, 1, 3)
    index = (pixels - palette).abs().sum(-1).argmin(-1)
    return index.to(rgb.device) if is_tensor else index.numpy()


def lesion_ring(mask: np.ndarray, inner_px: int = 2, outer_px: int = 4) -> np.ndarray:
    """Background annulus from ``inner_px`` to ``outer_px`` pixels outside a lesion mask (H, W); bool (H, W).

    The strain-ratio reference region: tissue next to the lesion, clear of its blurred edge.
    """
    mask = np.asarray(mask) > 0
    if not 0 <= inner_px < outer_px:
        raise ValueError(f"need 0 <= inner_px < outer_px, got {inner_px}, {outer_px}.")
    disk = ndimage.generate_binary_structure(2, 1)
    outer = ndimage.binary_dilation(mask, disk, iterations=outer_px)
    inner = ndimage.binary_dilation(mask, disk, iterations=inner_px) if inner_px else mask
    return outer & ~inner


def strain_ratio(index: np.ndarray, mask: np.ndarray, inner_px: int = 2, outer_px: int = 4) -> float:
    """Strain ratio SR = mean strain of the ring around the lesion / mean strain of the lesion (> 1: lesion
    stiffer than its surroundings), from a palette-index map (H, W) and a lesion mask (H, W).

    Raises
    ------
    ValueError
        The mask is empty, or the ring is (the lesion fills the image), or the shapes differ.
    """
    index, mask = np.asarray(index), np.asarray(mask) > 0
    if index.shape != mask.shape or index.ndim != 2:
        raise ValueError(f"index and mask must be the same (H, W) shape, got {index.shape} and {mask.shape}.")
    if not mask.any():
        raise ValueError("the lesion mask is empty: a strain ratio needs a lesion.")
    ring = lesion_ring(mask, inner_px, outer_px)
    if not ring.any():
        raise ValueError("no background ring around the lesion: the lesion fills the image.")
    strain = index_to_strain(index.astype(np.float64))
    return float(strain[ring].mean() / strain[mask].mean())


# sRGB (D65) -> XYZ, and the D65 white point
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = torch.tensor([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) of sRGB images ``[B, 3, H, W]`` in [0, 1]; returns ``[B, 3, H, W]`` (L in [0, 100], a and b
    roughly in [-110, 110]). Matches ``skimage.color.rgb2lab``."""
    rgb = rgb.float().clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb.device), linear) / _WHITE_D65.to(rgb.device)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    lightness = torch.where(xyz[:, 1:2] > 0.008856, 116.0 * f[:, 1:2] - 16.0, 903.3 * xyz[:, 1:2])
    return torch.cat([lightness, 500.0 * (f[:, 0:1] - f[:, 1:2]), 200.0 * (f[:, 1:2] - f[:, 2:3])], 1)


class ColourPrior:
    """Colour-rebalancing weights of the V-EUS L1 loss (chapter 8, Eq. 8.1):
    ``gamma_q = (alpha * p_q + (1 - alpha) / Q) ** -1``, normalised so that ``sum_q p_q gamma_q = 1`` (so the L1
    weight keeps its meaning), where ``p`` is the distribution of quantised Lab ab colours over the training
    elastograms and Q the number of occupied bins. A pixel's weight is the gamma of its *real* colour's bin, so rare
    colours (lesion blue and red) count more than the dominant background colours.

    The chapter gives alpha = 0.8 only; the ab grid (10 units over [-110, 110]) and the normalisation follow Zhang
    et al. (ECCV 2016); Q counts occupied bins (unoccupied bins never weight a real pixel).

    Args:
        weights: ``[n, n]`` gamma per (a, b) bin.
        grid: bin width in Lab units.
        ab_range: (low, high) of the a and b axes.
    """

    def __init__(self, weights: torch.Tensor, grid: float = 10.0, ab_range: tuple[float, float] = (-110.0, 110.0)):
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.grid, self.ab_range = float(grid), (float(ab_range[0]), float(ab_range[1]))
        bins = self.num_bins(self.grid, self.ab_range)
        if self.weights.shape != (bins, bins) or not torch.isfinite(self.weights).all() or (self.weights <= 0).any():
            raise ValueError(f"weights must be a positive finite [{bins}, {bins}] table, got {tuple(self.weights.shape)}.")

    @staticmethod
    def num_bins(grid: float, ab_range: tuple[float, float]) -> int:
        return int(np.ceil((ab_range[1] - ab_range[0]) / grid))

    @staticmethod
    def ab_bins(rgb: torch.Tensor, grid: float = 10.0, ab_range: tuple[float, float] = (-110.0, 110.0)) -> torch.Tensor:
        """(a, b) bin indices ``[B, 2, H, W]`` (int64) of RGB images ``[B, 3, H, W]`` in [0, 1]."""
        ab = rgb_to_lab(rgb)[:, 1:]
        bins = ColourPrior.num_bins(grid, ab_range)
        return ((ab - ab_range[0]) / grid).floor().long().clamp(0, bins - 1)

    @classmethod
    def fit(
        cls, elastograms: Iterable[torch.Tensor], alpha: float = 0.8, grid: float = 10.0,
        ab_range: tuple[float, float] = (-110.0, 110.0),
    ) -> ColourPrior:  # fmt: skip
        """Fit gamma to RGB elastograms (each ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1])."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        bins = cls.num_bins(grid, ab_range)
        counts = torch.zeros(bins * bins, dtype=torch.float64)
        for rgb in elastograms:
            rgb = torch.as_tensor(rgb, dtype=torch.float32)
            rgb = rgb[None] if rgb.ndim == 3 else rgb
            if rgb.ndim != 4 or rgb.shape[1] != 3 or not torch.isfinite(rgb).all():
                raise ValueError(f"elastograms must be finite [3, H, W] or [B, 3, H, W] RGB, got {tuple(rgb.shape)}.")
            index = cls.ab_bins(rgb, grid, ab_range)
            counts += torch.bincount((index[:, 0] * bins + index[:, 1]).flatten(), minlength=bins * bins).double()
        if counts.sum() == 0:
            raise ValueError("no elastogram pixels to fit the colour prior on.")
        p = counts / counts.sum()
        occupied = int((counts > 0).sum())
        gamma = 1.0 / (alpha * p + (1.0 - alpha) / occupied)
        gamma = gamma / (p * gamma).sum()
        return cls(gamma.float().reshape(bins, bins), grid, ab_range)

    def pixel_weights(self, rgb: torch.Tensor) -> torch.Tensor:
        """Per-pixel gamma ``[B, 1, H, W]`` of RGB images ``[B, 3, H, W]`` in [0, 1] (the real elastograms)."""
        index = self.ab_bins(rgb, self.grid, self.ab_range)
        return self.weights.to(rgb.device)[index[:, 0], index[:, 1]].unsqueeze(1)

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (atomically)."""
        content = {"grid": self.grid, "ab_range": list(self.ab_range), "weights": self.weights.tolist()}
        return write_json(content, path)

    @classmethod
    def load(cls, path: str | Path) -> ColourPrior:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"colour prior '{path}' does not exist; fit it with ColourPrior.fit_or_load.")
        content = json.loads(path.read_text())
        return cls(torch.tensor(content["weights"]), content["grid"], tuple(content["ab_range"]))

    @classmethod
    def fit_or_load(cls, path: str | Path, dataset, key: str = "elastogram", alpha: float = 0.8, grid: float = 10.0) -> ColourPrior:
        """Load the table at ``path``; if absent, fit it to ``dataset[i][key]`` (RGB in [-1, 1], the network's range)
        and save it there, so the table is computed once per training set and ships with the bundle."""
        if Path(path).is_file():
            return cls.load(path)
        prior = cls.fit(((torch.as_tensor(item[key]) + 1.0) / 2.0 for item in dataset), alpha, grid)
        prior.save(path)
        return prior


def lesion_boxes(masks: torch.Tensor, margin: float = 0.25, min_size: int = 16) -> torch.Tensor:
    """Square boxes around the lesions of masks ``[B, 1, H, W]``: the tight box's longer side times
    ``1 + margin``, at least ``min_size`` pixels (at most the shorter image side), centred on the lesion and shifted
    inside the image. A mask without lesion gets the whole image (the defined fallback: the tumour discriminator
    then sees the global pair). Returns float ``[B, 4]`` as (row0, col0, row1, col1), end exclusive, in pixels."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [B, 1, H, W], got {tuple(masks.shape)}.")
    height, width = masks.shape[2:]
    boxes = []
    for mask in masks[:, 0] > 0:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        if rows.numel() == 0:
            boxes.append([0.0, 0.0, float(height), float(width)])
            continue
        r0, r1, c0, c1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        side = min(max(max(r1 - r0, c1 - c0) * (1.0 + margin), float(min_size)), float(min(height, width)))
        top = min(max((r0 + r1 - side) / 2.0, 0.0), height - side)
        left = min(max((c0 + c1 - side) / 2.0, 0.0), width - side)
        boxes.append([top, left, top + side, left + side])
    return torch.tensor(boxes, dtype=torch.float32, device=masks.device)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crops ``[B, C, size, size]`` of ``images [B, C, H, W]`` inside ``boxes [B, 4]`` (row0, col0, row1,
    col1 in pixels); differentiable with respect to ``images``."""
    height, width = images.shape[2:]
    boxes = boxes.to(images)
    centre_y = (boxes[:, 0] + boxes[:, 2]) / height - 1.0  # normalised [-1, 1] coordinates, align_corners=False
    centre_x = (boxes[:, 1] + boxes[:, 3]) / width - 1.0
    theta = torch.zeros(len(boxes), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = (boxes[:, 3] - boxes[:, 1]) / width
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = (boxes[:, 2] - boxes[:, 0]) / height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [len(boxes), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
