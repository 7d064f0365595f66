"""Edge conditions and edge fidelity (EMIT-Diff): image edges (Canny or Sobel), the 1-pixel boundary of a
segmentation mask, or their union, which the paper's fine-tuning stage conditions on; and the F1 between the edges
of a generated image and the conditioning edges within a pixel tolerance.

Images and masks are 2D, ``[H, W]`` or channel-first ``[1, H, W]``; edge maps are float ``[1, H, W]`` in {0, 1}.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = ["EDGE_MODES", "mask_boundary", "image_edges", "edge_map", "edge_f1", "EdgeMapd"]

EDGE_MODES = ("image", "mask", "union")


def _plane(array, name: str) -> np.ndarray:
    plane = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    if plane.ndim == 3 and plane.shape[0] == 1:
        plane = plane[0]
    if plane.ndim != 2:
        raise ValueError(f"{name} must be 2D, [H, W] or [1, H, W]; got shape {tuple(np.shape(array))}.")
    return plane


def mask_boundary(mask) -> np.ndarray:
    """The inner 1-pixel boundary of a mask (any value > 0 is foreground): foreground pixels with a 4-connected
    background neighbour or on the image border. ``[H, W]`` bool."""
    foreground = _plane(mask, "mask") > 0
    interior = ndimage.binary_erosion(foreground, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return foreground & ~interior


def image_edges(image, method: str = "canny", sigma: float = 1.0) -> np.ndarray:
    """Edges of a grey image, ``[H, W]`` bool: Canny (scikit-image, Gaussian ``sigma`` in pixels, its default
    hysteresis thresholds on the gradient of the image scaled to [0, 1]) or a Sobel magnitude above Otsu's threshold.
    """
    from skimage import feature, filters

    plane = _plane(image, "image").astype(np.float64)
    low, high = float(plane.min()), float(plane.max())
    plane = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
    if method == "canny":
        return feature.canny(plane, sigma=sigma)
    if method == "sobel":
        magnitude = filters.sobel(ndimage.gaussian_filter(plane, sigma) if sigma > 0 else plane)
        return magnitude > filters.threshold_otsu(magnitude) if magnitude.max() > 0 else np.zeros_like(plane, bool)
    raise ValueError(f"method must be 'canny' or 'sobel', got '{method}'.")


def edge_map(image=None, mask=None, mode: str = "union", method: str = "canny", sigma: float = 1.0) -> torch.Tensor:
    """The conditioning edge map ``[1, H, W]`` (float32, 0 or 1) of ``mode``: ``"image"`` edges, the ``"mask"``
    boundary, or their ``"union"`` (EMIT-Diff's fine-tuning condition)."""
    if mode not in EDGE_MODES:
        raise ValueError(f"mode must be one of {EDGE_MODES}, got '{mode}'.")
    if mode in ("image", "union") and image is None:
        raise ValueError(f"edge mode '{mode}' needs the image.")
    if mode in ("mask", "union") and mask is None:
        raise ValueError(f"edge mode '{mode}' needs the mask.")
    edges = None
    if mode in ("image", "union"):
        edges = image_edges(image, method, sigma)
    if mode in ("mask", "union"):
        boundary = mask_boundary(mask)
        if edges is not None and edges.shape != boundary.shape:
            raise ValueError(f"image {edges.shape} and mask {boundary.shape} differ in shape.")
        edges = boundary if edges is None else edges | boundary
    return torch.from_numpy(edges.astype(np.float32))[None]


def edge_f1(edges, reference, tolerance_px: float = 2.0) -> dict:
    """Edge fidelity: ``precision`` (edge pixels of ``edges`` within ``tolerance_px`` of a ``reference`` edge),
    ``recall`` (reference edge pixels within the tolerance of ``edges``) and their harmonic mean ``f1``. Both maps
    empty give 1; one empty gives 0."""
    predicted, target = _plane(edges, "edges") > 0.5, _plane(reference, "reference") > 0.5
    if predicted.shape != target.shape:
        raise ValueError(f"edge maps differ in shape: {predicted.shape} and {target.shape}.")
    if not predicted.any() and not target.any():
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if not predicted.any() or not target.any():
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    to_target = ndimage.distance_transform_edt(~target)
    to_predicted = ndimage.distance_transform_edt(~predicted)
    precision = float((to_target[predicted] <= tolerance_px).mean())
    recall = float((to_predicted[target] <= tolerance_px).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class EdgeMapd(MapTransform):
    """Add the edge map of ``image_key`` and/or ``mask_key`` under ``output_key`` (``[1, H, W]``), see
    :func:`edge_map`."""

    def __init__(
        self,
        image_key: str | None = "image",
        mask_key: str | None = "label",
        output_key: str = "edges",
        mode: str = "union",
        method: str = "canny",
        sigma: float = 1.0,
    ):
        keys: KeysCollection = [key for key in (image_key, mask_key) if key is not None]
        super().__init__(keys)
        self.image_key, self.mask_key, self.output_key = image_key, mask_key, output_key
        self.mode, self.method, self.sigma = mode, method, sigma

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.image_key] if self.mode != "mask" else None
        mask = d[self.mask_key] if self.mode != "image" else None
        d[self.output_key] = edge_map(image, mask, self.mode, self.method, self.sigma)
        return d
