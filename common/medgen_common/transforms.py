"""Transforms shared by the bundles: probabilistic label maps, intensity normalisation, divisible shapes, conditions.

Label maps are channel-first in memory, ``[C, *spatial]``, with channel 0 the background and the channels of
every voxel summing to 1 ("probabilistic" or partial-volume maps). On disk they are channel-last NIfTI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import LoadImage, LoadImaged, MapTransform, Randomizable, ResizeWithPadOrCrop
from monai.utils import convert_to_tensor

from .mri import SingleCoilMRI, channels_to_complex, complex_to_channels, make_mask
from .writers import atomic_path, save_nifti, save_overlay_png

__all__ = [
    "normalise_probabilities",
    "probabilities_to_one_hot",
    "one_hot_to_probabilities",
    "divisible_shape",
    "NormaliseProbabilitiesd",
    "ProbabilitiesToOneHotd",
    "ModalityNormalised",
    "DivisiblePadOrCropd",
    "LesionSizeConditiond",
    "ImageFileError",
    "read_image_file",
    "SafeLoadImaged",
    "ValidateImaged",
    "RandPickd",
    "RandSliced",
    "RandUndersampled",
    "LoadStackd",
    "SaveNamedNiftid",
    "AtomicNibabelWriter",
    "SaveOverlayPngd",
]


def normalise_probabilities(label: torch.Tensor, recompute_background: bool = True) -> torch.Tensor:
    """Clip a label map to [0, 1] and make its channels sum to 1.

    Args:
        label: ``[C, *spatial]`` (or ``[B, C, *spatial]`` with ``channel_dim`` 1 handled by the caller).
        recompute_background: set channel 0 to ``1 - sum(other channels)`` (clipped at 0) before renormalising,
            as the brainSPADE loaders do; otherwise only renormalise.
    """
    label = torch.clamp(label.float(), 0.0, 1.0)
    if recompute_background:
        foreground_sum = label[1:].sum(0, keepdim=True)
        label = torch.cat([torch.clamp(1.0 - foreground_sum, min=0.0), label[1:]], 0)
    total = label.sum(0, keepdim=True)
    # voxels with no mass at all become background
    empty = total <= 1e-8
    label = torch.where(empty, torch.zeros_like(label), label / total.clamp_min(1e-8))
    label[0:1] = torch.where(empty, torch.ones_like(label[0:1]), label[0:1])
    return label


def probabilities_to_one_hot(label: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Hard one-hot map of the most probable class along ``dim`` (same shape and dtype as the input)."""
    index = label.argmax(dim=dim, keepdim=True)
    return torch.zeros_like(label).scatter_(dim, index, 1.0)


def one_hot_to_probabilities(one_hot: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """Turn a hard one-hot map ``[C, *spatial]`` into a probabilistic one by Gaussian smoothing each channel.

    Args:
        one_hot: hard map, channel-first.
        sigma: smoothing width in voxels; 0 returns the map as float.
    """
    one_hot = one_hot.float()
    if sigma <= 0:
        return one_hot
    from monai.transforms import GaussianSmooth

    smoothed = GaussianSmooth(sigma=sigma)(one_hot)
    return normalise_probabilities(convert_to_tensor(smoothed, track_meta=False), recompute_background=False)


def divisible_shape(spatial_shape: Sequence[int], k: int | Sequence[int], method: str = "pad") -> tuple[int, ...]:
    """Smallest (``method="pad"``) or largest (``"crop"``) shape whose every size is a multiple of ``k``."""
    factors = [k] * len(spatial_shape) if isinstance(k, int) else list(k)
    if len(factors) != len(spatial_shape):
        raise ValueError(f"k has {len(factors)} entries but the shape {tuple(spatial_shape)} has {len(spatial_shape)}.")
    if method == "pad":
        return tuple(int(-(-s // f) * f) for s, f in zip(spatial_shape, factors))
    if method == "crop":
        shape = tuple(int((s // f) * f) for s, f in zip(spatial_shape, factors))
        if min(shape) < 1:
            raise ValueError(f"cannot crop {tuple(spatial_shape)} to a multiple of {factors}: a size would be 0.")
        return shape
    raise ValueError(f"method must be 'pad' or 'crop', got '{method}'.")


class NormaliseProbabilitiesd(MapTransform):
    """Clip probabilistic label maps to [0, 1], recompute the background and renormalise (see
    :func:`normalise_probabilities`)."""

    def __init__(self, keys: KeysCollection, recompute_background: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.recompute_background = recompute_background

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            normalised = normalise_probabilities(convert_to_tensor(label, track_meta=False), self.recompute_background)
            d[key] = MetaTensor(normalised, meta=label.meta) if isinstance(label, MetaTensor) else normalised
        return d


class ProbabilitiesToOneHotd(MapTransform):
    """Replace probabilistic label maps ``[C, *spatial]`` by the one-hot map of their argmax."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = probabilities_to_one_hot(d[key], dim=0)
        return d


class ModalityNormalised(MapTransform):
    """Per-modality intensity normalisation to roughly [0, 1].

    - ``"mri"``: the ``upper`` percentile (default 99.5) of the non-zero voxels maps to 1 and 0 stays 0 (with
      ``lower`` > 0, the ``lower`` percentile maps to 0 instead), clipped; MR intensities have no absolute scale,
      so each image is scaled on its own.
    - ``"ct"``: Hounsfield units ``window`` (default [-1000, 1000]) map to 0-1, clipped.
    - ``"ultrasound"``: 8-bit grey levels divided by 255.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "mri",
        lower: float = 0.0,
        upper: float = 99.5,
        window: Sequence[float] = (-1000.0, 1000.0),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if modality not in ("mri", "ct", "ultrasound"):
            raise ValueError(f"modality must be 'mri', 'ct' or 'ultrasound', got '{modality}'.")
        self.modality, self.lower, self.upper, self.window = modality, lower, upper, tuple(window)

    def _normalise(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float()
        if self.modality == "ct":
            low, high = self.window
        elif self.modality == "ultrasound":
            low, high = 0.0, 255.0
        else:
            values = image[image != 0]
            if values.numel() == 0:
                return torch.zeros_like(image)
            values = values.flatten()[:: values.numel() // 2**24 + 1]  # torch.quantile takes at most 2**24 values
            low = float(torch.quantile(values, self.lower / 100.0)) if self.lower > 0 else 0.0
            high = float(torch.quantile(values, self.upper / 100.0))
        if high <= low:
            return torch.zeros_like(image)
        return torch.clamp((image - low) / (high - low), 0.0, 1.0)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._normalise(d[key])
        return d


class DivisiblePadOrCropd(MapTransform):
    """Symmetrically pad (``method="pad"``) or centre-crop (``"crop"``) every spatial size to a multiple of ``k``,
    e.g. the network's total down-sampling factor. Padding uses zeros, except channel 0 of label maps when
    ``background_fill_keys`` names them, which is padded with 1 so the maps still sum to 1."""

    def __init__(
        self,
        keys: KeysCollection,
        k: int | Sequence[int],
        method: str = "pad",
        background_fill_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.k, self.method = k, method
        self.background_fill_keys = (
            {background_fill_keys} if isinstance(background_fill_keys, str) else set(background_fill_keys)
        )
        divisible_shape([1], 1, method)  # validates the method name early

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            target = divisible_shape(image.shape[1:], self.k, self.method)
            resized = ResizeWithPadOrCrop(spatial_size=target)(image)
            if key in self.background_fill_keys and self.method == "pad":
                padded_region = ResizeWithPadOrCrop(spatial_size=target)(torch.ones_like(image[:1])) == 0
                resized[0:1] = torch.where(padded_region, torch.ones_like(resized[0:1]), resized[0:1])
            d[key] = resized
        return d


class LesionSizeConditiond(MapTransform):
    """Lesion-size condition of brainSPADE (chapter 1, Eq. 1.3): ``dc_l = soft volume of lesion l / dataset max``.

    Reads a probabilistic label map ``[C, *spatial]`` and writes a ``[1, L]`` float tensor (one token of ``L``
    lesion sizes, the cross-attention context shape) under ``output_key``. Values are in [0, 1] for maps of the
    training set, 0 meaning no lesion. Volumes are soft sums in voxels of the label's own grid.

    Args:
        label_key: key of the label map.
        lesion_channel_indices: channel index of each lesion, in condition order (e.g. wmh, tumour, oedema,
            enhancing).
        max_volume: per-lesion maximum soft volume over the training set (voxels), same order.
        output_key: where to write the condition.
    """

    def __init__(
        self,
        label_key: str,
        lesion_channel_indices: Sequence[int],
        max_volume: Sequence[float],
        output_key: str = "lesion_size_condition",
    ):
        super().__init__(label_key)
        if len(lesion_channel_indices) != len(max_volume):
            raise ValueError(
                f"{len(lesion_channel_indices)} lesion channels but {len(max_volume)} max volumes were given."
            )
        self.label_key, self.output_key = label_key, output_key
        self.lesion_channel_indices = [int(i) for i in lesion_channel_indices]
        if any(i < 0 for i in self.lesion_channel_indices):
            raise ValueError(f"lesion channel indices must be >= 0, got {self.lesion_channel_indices}.")
        # a lesion never seen in training has max 0: its condition is always 0
        self.max_volume = torch.tensor([float(v) if v > 0 else float("inf") for v in max_volume])

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        label = convert_to_tensor(d[self.label_key], track_meta=False)
        if max(self.lesion_channel_indices) >= label.shape[0]:
            raise ValueError(
                f"lesion channels {self.lesion_channel_indices} do not exist in a label map with {label.shape[0]} channels."
            )
        volume = label[self.lesion_channel_indices].float().flatten(1).sum(1)
        d[self.output_key] = (volume / self.max_volume).clamp(0.0, 1.0).unsqueeze(0)
        return d


class ImageFileError(ValueError):
    """An image file that cannot be read, or holds NaN or Inf; the message names the file."""


def _source(value) -> str:
    return str(getattr(value, "meta", {}).get("filename_or_obj", "<in memory>"))


def _refuse_nonfinite(key: Hashable, value, source: str) -> None:
    array = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if array.is_floating_point() and not torch.isfinite(array).all():
        raise ImageFileError(f"'{key}' from '{source}' contains NaN or Inf values.")


def _unreadable(key: Hashable, path, err: Exception) -> ImageFileError:
    reason = err.__cause__ or err  # MONAI wraps the reader's own error
    return ImageFileError(
        f"'{key}' file '{path}' cannot be read (missing, truncated or corrupt): {type(reason).__name__}: {reason}"
    )


def read_image_file(loader: LoadImage, path, key: Hashable = "image"):
    """``loader(path)``, but a file that cannot be read, or that holds NaN or Inf, raises :class:`ImageFileError`
    naming ``key`` and the file (MONAI's own error names neither the file nor, for a truncated gzip, the cause)."""
    try:
        image = loader(path)
    except Exception as err:
        raise _unreadable(key, path, err) from err
    _refuse_nonfinite(key, image[0] if isinstance(image, tuple) else image, str(path))
    return image


class SafeLoadImaged(LoadImaged):
    """MONAI's ``LoadImaged`` (same arguments) that refuses what a researcher's folder often holds by accident: a
    missing, truncated or corrupt file, or one with NaN or Inf values. Either raises :class:`ImageFileError`
    naming the key and the file."""

    def __call__(self, data, reader=None):
        try:
            d = super().__call__(data, reader)
        except Exception:
            for key in self.key_iterator(dict(data)):  # find the file that failed to name it
                read_image_file(self._loader, data[key], key)
            raise  # every file reads alone: not a file problem
        for key in self.key_iterator(d):
            _refuse_nonfinite(key, d[key], str(data[key]))
        return d


class ValidateImaged(MapTransform):
    """Refuse channel-first images ``[C, *spatial]`` that this model cannot take, naming the key and the file:
    NaN or Inf values, a wrong number of spatial dimensions or channels, or (``probabilities``) a label map whose
    values leave [0, 1] or whose channels do not sum to 1 within ``tolerance``.

    Args:
        keys: the images to check; all get the same checks.
        spatial_dims: 2 or 3, or None to accept either.
        channels: the channel count the model needs, or None.
        channel_names: named in the channel-count message (e.g. the label classes).
        probabilities: check the probabilistic label map convention of this module.
        tolerance: slack of the probability checks.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int | None = None,
        channels: int | None = None,
        channel_names: Sequence[str] | None = None,
        probabilities: bool = False,
        tolerance: float = 0.01,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if channel_names is not None and channels is None:
            channels = len(channel_names)
        self.spatial_dims, self.channels, self.channel_names = spatial_dims, channels, channel_names
        self.probabilities, self.tolerance = probabilities, tolerance

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        for key in self.key_iterator(data):
            value, source = data[key], _source(data[key])
            _refuse_nonfinite(key, value, source)
            shape = tuple(value.shape)
            if self.spatial_dims is not None and len(shape) != self.spatial_dims + 1:
                axes = ", ".join("CHWD"[: self.spatial_dims + 1])
                raise ValueError(
                    f"'{key}' from '{source}' has shape {shape}; this model needs a channel-first "
                    f"{self.spatial_dims}D image [{axes}]."
                )
            if self.channels is not None and shape[0] != self.channels:
                names = f" ({', '.join(self.channel_names)})" if self.channel_names else ""
                raise ValueError(
                    f"'{key}' from '{source}' has {shape[0]} channel(s) (shape {shape}); this model needs "
                    f"{self.channels}{names}."
                )
            if self.probabilities:
                self._check_probabilities(key, torch.as_tensor(value).float(), source)
        return dict(data)

    def _check_probabilities(self, key: Hashable, label: torch.Tensor, source: str) -> None:
        low, high = float(label.min()), float(label.max())
        total = label.sum(0)
        off = (total - 1.0).abs() > self.tolerance
        if low < -self.tolerance or high > 1.0 + self.tolerance or bool(off.any()):
            raise ValueError(
                f"'{key}' from '{source}' is not a probabilistic label map: values span [{low:.3g}, {high:.3g}] and "
                f"the channel sums span [{float(total.min()):.3g}, {float(total.max()):.3g}] ({float(off.float().mean()):.1%} "
                f"of voxels off 1 by more than {self.tolerance}); give one channel per class, background first, "
                "with values in [0, 1] that sum to 1 in every voxel (one-hot or soft)."
            )


class RandPickd(Randomizable, MapTransform):
    """Replace the list of candidates under each key by one of them, drawn at random (e.g. the style slice among
    the other slices of the same subject and contrast, see :func:`medgen_common.datalist.make_style_pairs`).

    Raises:
        ValueError: a candidate list is empty.
    """

    def __call__(self, data: Mapping[Hashable, Sequence]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            candidates = d[key]
            if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
                continue  # already a single value
            if len(candidates) == 0:
                raise ValueError(f"'{key}' has no candidates to pick from.")
            d[key] = candidates[self.R.randint(len(candidates))]
        return d


class RandSliced(Randomizable, MapTransform):
    """Replace a channel-first 3D image ``[C, X, Y, Z]`` by one random 2D slice ``[C, *, *]`` along ``axis`` (0 =
    sagittal for RAS volumes), drawn among slices whose non-zero area is at least ``min_area_fraction`` of the
    largest one (so a style slice shows tissue, not the edge of the head).
    """

    def __init__(
        self, keys: KeysCollection, axis: int = 0, min_area_fraction: float = 0.5, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis of [C, X, Y, Z]), got {axis}.")
        self.axis, self.min_area_fraction = axis, min_area_fraction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False)
            if image.ndim != 4:
                raise ValueError(
                    f"'{key}' must be a channel-first 3D image [C, X, Y, Z], got shape {tuple(image.shape)}."
                )
            spatial_axis = self.axis + 1
            other = tuple(a for a in range(4) if a != spatial_axis)
            area = (image != 0).sum(dim=other).float()
            candidates = torch.nonzero(area >= self.min_area_fraction * area.max()).flatten()
            index = int(candidates[self.R.randint(len(candidates))])
            d[key] = image.select(spatial_axis, index)
        return d


class RandUndersampled(Randomizable, MapTransform):
    """Simulate accelerated single-coil MRI for supervised training: the fully sampled complex image ``[2, H, W]``
    (real, imaginary channels) under each key moves to ``target_key`` (e.g. "label") and is replaced by its
    zero-filled reconstruction from a Cartesian mask drawn afresh each call (``medgen_common.mri.make_mask``).

    Raises:
        ValueError: an image that is not ``[2, H, W]``.
    """

    def __init__(self, keys: KeysCollection, mask_kind: str, acceleration: float, center_fraction: float = 0.08,
                 target_key: str = "label", allow_missing_keys: bool = False):  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.mask_kind, self.acceleration, self.center_fraction = mask_kind, acceleration, center_fraction
        self.target_key = target_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False).float()
            if image.ndim != 3 or image.shape[0] != 2:
                raise ValueError(
                    f"'{key}' must be a complex image as [2, H, W] (real, imaginary), got {tuple(image.shape)}."
                )
            mask = make_mask(self.mask_kind, tuple(image.shape[-2:]), self.acceleration, self.center_fraction,
                             seed=int(self.R.randint(2**31)))  # fmt: skip
            operator = SingleCoilMRI(mask)
            d[self.target_key] = image
            d[key] = complex_to_channels(operator.AH(operator.A(channels_to_complex(image[None]))))[0]
        return d


class LoadStackd(MapTransform):
    """Load a list of image files under each key and stack them along a new first (channel) axis, ``[K, *shape]``.
    Unlike ``LoadImaged`` with a list, the files may have different affines (e.g. different slices of a volume);
    the stack keeps no spatial metadata. All files must have one shape.

    Raises:
        ValueError: the list is empty or the shapes differ (the message names the file).
        ImageFileError: a file cannot be read or holds NaN or Inf.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(image_only=True)

    def __call__(self, data: Mapping[Hashable, Sequence[str]]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = [d[key]] if isinstance(d[key], str) else list(d[key])
            if not paths:
                raise ValueError(f"'{key}' lists no files to load.")
            images = [convert_to_tensor(read_image_file(self.loader, path, key), track_meta=False) for path in paths]
            for path, image in zip(paths, images):
                if image.shape != images[0].shape:
                    raise ValueError(
                        f"'{key}' file '{path}' has shape {tuple(image.shape)}, '{paths[0]}' has {tuple(images[0].shape)}."
                    )
            d[key] = torch.stack(images)
        return d


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer for ``SaveImaged`` (``"writer": "$medgen_common.transforms.AtomicNibabelWriter"``) that
    writes to a temporary name and renames it into place, so a killed run never leaves a truncated file."""

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        with atomic_path(filename) as temporary:
            super().write(str(temporary), verbose=verbose, **obj_kwargs)


class SaveNamedNiftid(MapTransform):
    """Write each key's image ``[C, *spatial]`` to ``output_dir/<data[name_key]>[_<key>].nii.gz`` with the affine of
    ``data[affine_key]`` (a MetaTensor, e.g. the input label map), so outputs overlay their inputs. Single-channel
    images are written without a channel axis (2D as X x Y x 1), multi-channel ones channel-last.

    Use it where one input gives several outputs (e.g. one label map, several contrasts) and MONAI's ``SaveImaged``
    would name them alike. The written path is stored under ``<key>_path``.
    """

    def __init__(
        self, keys: KeysCollection, output_dir: str, name_key: str = "output_name", affine_key: str | None = None,
        add_key_suffix: bool = False,
    ):  # fmt: skip
        super().__init__(keys)
        self.output_dir, self.name_key, self.affine_key, self.add_key_suffix = (
            output_dir,
            name_key,
            affine_key,
            add_key_suffix,
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        source = d[self.affine_key] if self.affine_key is not None else None
        affine = getattr(source, "affine", None)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False).detach().cpu().float()
            name = f"{d[self.name_key]}_{key}" if self.add_key_suffix else str(d[self.name_key])
            path = Path(self.output_dir) / f"{name}.nii.gz"
            if image.shape[0] == 1:
                save_nifti(image[0], path, affine, channel_first=False)
            else:
                save_nifti(image, path, affine, channel_first=True)
            d[f"{key}_path"] = str(path)
        return d


class SaveOverlayPngd(MapTransform):
    """Write ``output_dir/<stem of data[grey_key]'s file>_overlay.png`` for each key's colour image ``[3, H, W]`` in
    [0, 1]: the grey image, the colour image and their blend (:func:`~medgen_common.writers.save_overlay_png`), e.g.
    a virtual elastogram beside and over its B-mode. ``data[grey_key]`` is ``[1, H, W]`` in [0, 1], a MetaTensor
    that knows its file. The written path is stored under ``<key>_png``."""

    def __init__(self, keys: KeysCollection, grey_key: str, output_dir: str, alpha: float = 0.6, upscale: int = 2):
        super().__init__(keys)
        self.grey_key, self.output_dir, self.alpha, self.upscale = grey_key, output_dir, alpha, upscale

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        grey = d[self.grey_key]
        source = Path(str(grey.meta.get("filename_or_obj", "image"))) if isinstance(grey, MetaTensor) else Path("image")
        stem = source.name.removesuffix(".gz").removesuffix(".nii")
        for key in self.key_iterator(d):
            path = Path(self.output_dir) / f"{stem}_overlay.png"
            save_overlay_png(grey.detach().cpu(), d[key].detach().cpu(), path, self.alpha, self.upscale)
            d[f"{key}_png"] = str(path)
        return d
