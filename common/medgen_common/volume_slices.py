"""The user-data path of the slice-based prostate bundle: multi-sequence MR volumes (PI-CAI style: T2W, ADC, DW and a
lesion mask per case) to the 2D slice datalist the bundle trains on (prostate spec sections 3.2 and 9).

Per case: every sequence and the mask are resampled to the grid of the reference sequence (T2W;
``ResampleToMatch``, nearest neighbour for the mask), each image volume is windowed to [0, 1] between its own
percentiles (per volume, not per slice, so a bright DW lesion does not rescale its slice), and the
``num_central_slices`` central axial slices are written as ``<case>_z<k>_<key>.nii.gz`` (H x W x 1). A slice's
``lesion_present`` is whether the mask has any voxel > 0 on it (the chapter's slice label), ``lesion_centre`` the
mask's centroid on the slice (row, column) or null.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage, ResampleToMatch
from monai.utils import convert_to_tensor
from scipy import ndimage

from .datalist import load_datalist
from .writers import save_nifti, write_json

__all__ = ["extract_central_slices"]


def _window(volume: torch.Tensor, low: float, high: float) -> torch.Tensor:
    lo, hi = np.percentile(volume.numpy(), [low, high])
    if hi <= lo:
        raise ValueError(f"the volume is constant between its {low} and {high} percentiles ({lo}); cannot window it.")
    return ((volume - lo) / (hi - lo)).clamp(0.0, 1.0)


def extract_central_slices(
    datalist: str | Path,
    output_dir: str | Path,
    sequences: Sequence[str] = ("t2w", "adc", "dwi"),
    mask_key: str = "lesion",
    reference: str = "t2w",
    num_central_slices: int = 10,
    percentiles: Sequence[float] = (0.5, 99.5),
    splits: Sequence[str] = ("training", "validation", "test"),
) -> Path:
    """Write the central slices of every case of ``datalist`` (entries ``{sequence: path, mask_key: path, ...}``
    per split; splits absent from the file are skipped) under ``output_dir`` and return ``datalist_2d.json``.

    Raises:
        ValueError: a volume has fewer than ``num_central_slices`` slices, or no listed split exists.
        DatalistError: an entry misses a key or a file.
    """
    if reference not in sequences:
        raise ValueError(f"the reference sequence {reference!r} must be one of {list(sequences)}.")
    output_dir = Path(output_dir)
    (output_dir / "2d").mkdir(parents=True, exist_ok=True)
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    content: dict = {}
    for split in splits:
        try:
            entries = load_datalist(datalist, split, [*sequences, mask_key])
        except ValueError as error:
            if f"no '{split}' list" in str(error):
                continue
            raise
        items = []
        for index, entry in enumerate(entries):
            case = str(entry.get("case", Path(entry[reference]).name.split(".")[0]))
            target = loader(entry[reference])
            volumes = {reference: target}
            for key in [s for s in sequences if s != reference] + [mask_key]:
                mode = "nearest" if key == mask_key else "bilinear"
                volumes[key] = ResampleToMatch(mode=mode)(loader(entry[key]), target)
            depth = target.shape[-1]
            if depth < num_central_slices:
                raise ValueError(
                    f"case '{case}' has {depth} slices in '{entry[reference]}', fewer than num_central_slices={num_central_slices}."
                )
            start = (depth - num_central_slices) // 2
            images = {
                s: _window(convert_to_tensor(volumes[s], track_meta=False).float(), *percentiles) for s in sequences
            }
            mask = np.asarray(volumes[mask_key])[0] > 0
            affine = np.asarray(target.affine, dtype=float)
            for z in range(start, start + num_central_slices):
                item = {"case": case, "slice": z}
                for key, array in [
                    *((s, images[s][0, ..., z].numpy()) for s in sequences),
                    (mask_key, mask[..., z].astype(np.uint8)),
                ]:
                    name = f"2d/{case}_z{z:03d}_{key}.nii.gz"
                    slice_affine = affine.copy()
                    slice_affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, z]) + affine[:3, 3]
                    save_nifti(array[..., None], output_dir / name, slice_affine, channel_first=False)
                    item[key] = name
                present = bool(mask[..., z].any())
                item["lesion_present"] = int(present)
                item["lesion_centre"] = (
                    [round(float(c), 3) for c in ndimage.center_of_mass(mask[..., z])] if present else None
                )
                items.append(item)
        content[split] = items
    if not content:
        raise ValueError(f"'{datalist}' has none of the splits {list(splits)}.")
    content.update(sequences=list(sequences), description=(
        f"{num_central_slices} central axial slices per case of '{datalist}', resampled to the {reference} grid and "
        f"windowed per volume between the {percentiles[0]} and {percentiles[1]} percentiles "
        "(medgen_common.volume_slices)."
    ))  # fmt: skip
    return write_json(content, output_dir / "datalist_2d.json")
