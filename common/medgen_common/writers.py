"""Writers for results a person opens: NIfTI volumes with a correct affine, PNG grids for a quick look.

Every file is written to a temporary name in the target folder and renamed into place, so a killed run never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_path",
    "write_text",
    "save_nifti",
    "label_map_to_rgb",
    "image_to_uint8",
    "save_png_grid",
    "save_overlay_png",
    "write_csv",
    "write_json",
    "read_json",
    "LABEL_PALETTE",
]

# background black, then distinct colours for tissue and lesion channels
LABEL_PALETTE = np.array(
    [
        [0, 0, 0], [70, 130, 180], [140, 140, 140], [235, 235, 235], [255, 215, 0],
        [220, 20, 60], [50, 205, 50], [255, 140, 0], [148, 0, 211], [0, 206, 209],
    ],
    dtype=np.uint8,
)  # fmt: skip


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds, delete it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep ".nii.gz" so writers pick the right format
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())  # on disk before it takes the final name, also across a power cut
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor (torch is not imported here, so the demo-data tools start fast)
        return array.detach().cpu().float().numpy() if array.is_floating_point() else array.detach().cpu().numpy()
    return np.asarray(array)


def save_nifti(
    array,
    path: str | Path,
    affine=None,
    spacing: Sequence[float] | None = None,
    channel_first: bool = True,
    compresslevel: int = 6,
) -> Path:
    """Save an image or label map as NIfTI with a meaningful affine.

    Args:
        array: ``[*spatial]`` or, with channels, ``[C, *spatial]`` (``channel_first``) or ``[*spatial, C]``.
            2D arrays get a singleton z axis, so a 2D label map ``[C, H, W]`` is written ``H x W x 1 x C``.
        path: output ``.nii`` or ``.nii.gz`` path.
        affine: 4x4 voxel-to-world (RAS, mm) matrix; default ``diag(spacing)``.
        spacing: voxel size in mm, used when ``affine`` is None (default 1 mm).
        channel_first: whether ``array`` has a leading channel axis.
        compresslevel: gzip level for ``.nii.gz`` (1 is fastest).
    """
    data = _to_numpy(array)
    if channel_first:
        data = np.moveaxis(data, 0, -1)
        spatial_ndim = data.ndim - 1
        if spatial_ndim == 2:
            data = data[:, :, None, :]
    elif data.ndim == 2:
        data = data[:, :, None]
    if affine is None:
        spacing = list(spacing) if spacing is not None else [1.0, 1.0, 1.0]
        affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    affine = _to_numpy(affine).astype(np.float64)
    if affine.shape != (4, 4):  # 2D affines (3x3) get a z row and column
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as temporary:
        if str(path).endswith(".gz"):
            # gzip header with time stamp 0 and no file name: equal data give byte-identical files
            with (
                open(temporary, "wb") as file,
                gzip.GzipFile(filename="", mode="wb", fileobj=file, compresslevel=compresslevel, mtime=0) as stream,
            ):
                stream.write(image.to_bytes())
        else:
            nib.save(image, str(temporary))
    return Path(path)


def label_map_to_rgb(label: np.ndarray | torch.Tensor, palette: np.ndarray = LABEL_PALETTE) -> np.ndarray:
    """Colour a probabilistic or one-hot label map ``[C, H, W]`` by its argmax, returning ``[H, W, 3]`` uint8."""
    label = _to_numpy(label)
    if label.shape[0] > len(palette):
        raise ValueError(f"the palette has {len(palette)} colours but the label map has {label.shape[0]} channels.")
    return palette[label.argmax(0)]


def image_to_uint8(image: np.ndarray | torch.Tensor, value_range: Sequence[float] | None = None) -> np.ndarray:
    """Scale a grey image ``[H, W]`` (or ``[1, H, W]``) to uint8 ``[H, W, 3]``; default range: the image's min-max."""
    image = _to_numpy(image).astype(np.float32)
    if image.ndim == 3:
        image = image[0]
    low, high = value_range if value_range is not None else (float(image.min()), float(image.max()))
    scaled = np.clip((image - low) / max(high - low, 1e-8), 0, 1)
    return np.repeat((scaled * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def _middle_axial_slice(array: np.ndarray) -> np.ndarray:
    """``[C, H, W, D]`` -> ``[C, H, W]`` at the middle of the last axis; 2D input is returned unchanged."""
    return array[..., array.shape[-1] // 2] if array.ndim == 4 else array


def save_png_grid(
    items: Sequence,
    path: str | Path,
    kind: str = "image",
    ncols: int = 8,
    value_range: Sequence[float] | None = None,
    upscale: int = 2,
    rotate: bool = True,
) -> Path:
    """Write a grid of 2D images or label maps as one PNG (3D inputs show their middle axial slice).

    Args:
        items: each ``[C, H, W]`` or ``[C, H, W, D]``.
        path: output PNG.
        kind: ``"image"`` (grey, channel 0), ``"label"`` (argmax colours) or ``"rgb"`` (channels 0-2 as colour,
            in [0, 1]).
        ncols: grid columns.
        value_range: intensity window for images; default per image min-max.
        upscale: nearest-neighbour magnification so small demo images are visible.
        rotate: turn RAS x-y slices (MRI) so anterior is up; False for arrays whose rows are already image rows
            (ultrasound: rows are depth).
    """
    if len(items) == 0:
        raise ValueError("save_png_grid needs at least one item.")
    if kind not in ("image", "label", "rgb"):
        raise ValueError(f"kind must be 'image', 'label' or 'rgb', got {kind!r}.")
    tiles = []
    for item in items:
        array = _middle_axial_slice(_to_numpy(item))
        if rotate:
            array = np.rot90(array, k=1, axes=(-2, -1))  # RAS x-y -> image rows/cols
        if kind == "label":
            tiles.append(label_map_to_rgb(array))
        elif kind == "rgb":
            tiles.append((np.clip(np.moveaxis(array[:3], 0, -1), 0, 1) * 255).round().astype(np.uint8))
        else:
            tiles.append(image_to_uint8(array[0], value_range))
    height, width = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    ncols = min(ncols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    grid = np.zeros((nrows * (height + 2), ncols * (width + 2), 3), dtype=np.uint8)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, ncols)
        grid[
            row * (height + 2) : row * (height + 2) + tile.shape[0],
            col * (width + 2) : col * (width + 2) + tile.shape[1],
        ] = tile
    image = Image.fromarray(grid)
    if upscale > 1:
        image = image.resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return Path(path)


def save_overlay_png(grey: np.ndarray | torch.Tensor, rgb: np.ndarray | torch.Tensor, path: str | Path,
                     alpha: float = 0.6, upscale: int = 1) -> Path:  # fmt: skip
    """Write three panels side by side as one PNG: the grey image, the colour image, and the colour blended over the
    grey with opacity ``alpha`` (an elastogram over its B-mode, as a scanner shows it). Rows are image rows (depth
    for ultrasound), not rotated.

    Args:
        grey: ``[H, W]`` or ``[1, H, W]`` in [0, 1].
        rgb: ``[3, H, W]`` in [0, 1].
    """
    grey, rgb = _to_numpy(grey).astype(np.float32), _to_numpy(rgb).astype(np.float32)
    grey = grey[0] if grey.ndim == 3 else grey
    if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.shape[1:] != grey.shape:
        raise ValueError(f"need grey [H, W] and rgb [3, H, W] of the same size, got {grey.shape} and {rgb.shape}.")
    grey_rgb = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    colour = np.clip(np.moveaxis(rgb, 0, -1), 0, 1)
    panels = np.concatenate([grey_rgb, colour, (1 - alpha) * grey_rgb + alpha * colour], axis=1)
    image = Image.fromarray((panels * 255).round().astype(np.uint8))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return Path(path)


def write_csv(path: str | Path, columns: Sequence[str], rows: Sequence) -> Path:
    """Write ``rows`` (mappings) as CSV with a header of ``columns``, atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path``, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(content, path: str | Path) -> Path:
    """Write ``content`` as indented JSON, atomically."""

    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2))
    return Path(path)


def read_json(path: str | Path, what: str = "file"):
    """Read JSON, with a message naming ``what`` the file is when it does not exist (e.g. a training output)."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at '{path}'.")
    return json.loads(path.read_text())


def save_memorisation_gallery(
    samples: torch.Tensor,
    train: torch.Tensor,
    distances: Sequence[float],
    nearest_index: Sequence[int],
    path: str | Path,
    count: int = 8,
    **grid_args,
) -> Path:
    """PNG of the ``count`` generated samples closest to the training set (top row, closest first) above their
    nearest training images (bottom row), from :func:`medgen_common.metrics.memorisation_check`; ``grid_args`` go
    to :func:`save_png_grid` (e.g. ``value_range``, ``rotate``)."""
    if len(samples) != len(distances) or len(samples) != len(nearest_index):
        raise ValueError(
            f"need a distance and a nearest index per sample: {len(samples)} samples, {len(distances)} distances, "
            f"{len(nearest_index)} indices."
        )
    order = sorted(range(len(samples)), key=lambda i: distances[i])[: max(1, int(count))]
    items = [samples[i] for i in order] + [train[int(nearest_index[i])] for i in order]
    return save_png_grid(items, path, ncols=len(order), **grid_args)
