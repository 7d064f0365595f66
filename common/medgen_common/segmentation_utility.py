"""Does synthetic data help a downstream segmenter? Train one segmenter per training set, score each on real volumes.

The brainSPADE chapter's protocol, small enough for a CPU: a 2D segmenter is trained on each named training set
(e.g. ``"real"``, ``"synthetic"``, ``"real+synthetic"``) with the same seed and step budget, every slice of every
real test subject is predicted, the slices are stacked back into one volume per subject (ordered by
``"slice_index"``) and Dice is computed per class in 3D. The table reports the mean Dice over subjects and its ratio
to the set trained on real data. A small MONAI ``UNet`` stands in for the chapter's larger segmenter, so the
numbers compare training sets with each other, not with published Dice values.

Items are MONAI-style dicts ``{"image": path_or_array, "label": path_or_array, "subject": ..., "slice_index": ...}``
("subject" and "slice_index" are needed for evaluation only). Arrays hold what the files hold:

- image: one 2D slice, ``X x Y`` or ``X x Y x 1`` (NIfTI slices of the demo data are ``X x Y x 1``);
- label, ``label_format="soft"`` (the default): a probabilistic (soft) map with channels last, ``X x Y x C`` or
  ``X x Y x 1 x C``;
- label, ``label_format="index"``: an integer class-index map, ``X x Y`` or ``X x Y x 1`` (the ultrasound demo
  data's uint8 masks). The format is named, never guessed: an ``X x Y x 1`` soft map of one channel and an index map
  of a slice are the same array shape.

Segmentation targets are class indices: the soft label is reduced to the channels in ``class_channels`` (the first
is the background, left out of the scores unless asked for), the probability of every other channel is added to a
kept channel named by ``merge_into``, and the argmax is taken; an index label is mapped the same way (a kept value
becomes its position in ``class_channels``, any other value the position of its ``merge_into`` channel). Brain
lesions have no tissue class of their own in the chapter's tissue segmentation, and where they go changes the
scores (WMH into white matter, a tumour into "other"), so the caller must choose; there is no default.

A training set can also be trained with EMIT-Diff's patch mixing (``patch_mixing``): each of its real items then
lists, under ``"synthetic_images"``, one or more synthetic images generated from its own label, and at every step
each real slice is mixed patch-wise with one of them, drawn at random, keeping the real label
(:func:`~medgen_common.downstream_statistics.patch_mix`).

EMIT-Diff's study adds the rest: MONAI's ``AttentionUnet`` as the segmenter (``architecture``), one arm per
traditional augmentation (:func:`traditional_augmentation`), precision and recall beside Dice, HD95 and ASSD, and
K-fold cross-validation whose folds :func:`combine_folds` joins into one result over every subject.

Images are normalised by ``normalisation``: ``"zscore_nonzero"`` (the default) z-scores inside the non-zero
(skull-stripped brain) region and leaves the outside at 0; ``"zscore"`` z-scores over the whole image (images that
are not skull-stripped, e.g. ultrasound); ``"none"`` passes intensities as they are (images already in a fixed
range such as [0, 1]).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import AttentionUnet, UNet
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    LoadImage,
    NormalizeIntensity,
    RandAdjustContrastd,
    RandAxisFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandZoomd,
)
from monai.utils import convert_to_tensor, optional_import

from .downstream_statistics import bootstrap_difference_ci, bootstrap_mean_ci, patch_mix
from .metrics import dice_per_class, precision_recall_per_class, surface_distances_per_class
from .runtime import select_device
from .transforms import ImageFileError, read_image_file

tqdm, _ = optional_import("tqdm", name="tqdm")

__all__ = [
    "SliceSegmenter",
    "TRADITIONAL_AUGMENTATIONS",
    "traditional_augmentation",
    "items_for_contrast",
    "group_by_subject",
    "merge_label_channels",
    "normalise_image",
    "load_array",
    "squeeze_slice",
    "load_slice",
    "train_segmenter",
    "predict_subject",
    "evaluate_segmenter",
    "compare_training_sets",
    "summarise_comparison",
    "combine_folds",
    "format_table",
    "format_summary_table",
]

MergeRule = int | Mapping[int, int]
LABEL_FORMATS = ("soft", "index")
NORMALISATIONS = ("zscore_nonzero", "zscore", "none")
SCORES = ("dice", "precision", "recall", "hd95", "assd")
ARCHITECTURES = ("unet", "attention_unet")
PARTNERS_KEY = "synthetic_images"


class SliceSegmenter(torch.nn.Module):
    """A small 2D MONAI ``UNet`` or ``AttentionUnet`` that keeps full resolution in its first level and takes slices
    of any size.

    MONAI's ``UNet`` applies each level's stride in that level's first convolution; with the usual stride 2 at the
    first level, nothing runs at the input resolution and one-voxel-thin structures (a grey-matter ribbon, a small
    lesion) are blurred away, so the first stride here is 1. ``AttentionUnet`` (EMIT-Diff's segmenter, S2:L219) has
    a full-resolution head of its own, so all its strides are 2. The input is zero-padded at the high end of each
    axis to a multiple of the downsampling factor and the output cropped back, so the demo slices (56 x 72) and odd
    sizes both work; zero is the value outside the brain after z-scoring with ``nonzero=True`` (and the mean after
    z-scoring the whole image).

    Args:
        num_classes: output channels (classes, background included).
        channels: feature channels per level; the first level keeps the input resolution, every later one halves
            it (``UNet``: every level after the second). The default, ``(8, 16, 32, 64)``, takes about 0.1 s per
            training step of 16 slices of 56 x 72 on one CPU thread (``UNet``), so 500 steps take about a minute.
        num_res_units: residual units per level of the ``UNet`` (0: plain convolutions, twice as fast as 1).
        architecture: ``"unet"`` or ``"attention_unet"``.
    """

    def __init__(
        self,
        num_classes: int,
        channels: Sequence[int] = (8, 16, 32, 64),
        num_res_units: int = 0,
        architecture: str = "unet",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + a class), got {num_classes}.")
        if len(channels) < 2:
            raise ValueError(f"channels must name at least 2 levels, got {tuple(channels)}.")
        _check_choice("architecture", architecture, ARCHITECTURES)
        self.num_classes = num_classes
        layout = {"spatial_dims": 2, "in_channels": 1, "out_channels": num_classes, "channels": tuple(channels)}
        if architecture == "unet":
            self.size_divisor = 2 ** (len(channels) - 2)
            strides = (1,) + (2,) * (len(channels) - 2)
            self.unet = UNet(**layout, strides=strides, num_res_units=num_res_units)
        else:
            self.size_divisor = 2 ** (len(channels) - 1)
            self.unet = AttentionUnet(**layout, strides=(2,) * (len(channels) - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map z-scored slices ``[B, 1, X, Y]`` to class logits ``[B, num_classes, X, Y]``."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"SliceSegmenter expects slices [B, 1, X, Y], got shape {tuple(images.shape)}.")
        size_x, size_y = images.shape[2:]
        pad_x, pad_y = (-size_x) % self.size_divisor, (-size_y) % self.size_divisor
        logits = self.unet(torch.nn.functional.pad(images, (0, pad_y, 0, pad_x)))
        return logits[:, :, :size_x, :size_y]


#: EMIT-Diff's single traditional augmentations (S2:L221), each a baseline arm of its segmentation study.
TRADITIONAL_AUGMENTATIONS = ("contrast", "gamma", "brightness", "noise", "resolution", "mirror", "rotate", "scale")


def traditional_augmentation(name: str, prob: float = 0.5, seed: int = 0) -> Compose:
    """One of :data:`TRADITIONAL_AUGMENTATIONS` as a seeded MONAI dict transform on a normalised sample
    ``{"image": [1, X, Y], "label": [1, X, Y]}`` (the spatial ones move the label with the image, nearest-neighbour).

    Ranges follow nnU-Net's defaults, written for z-scored images: contrast x [0.75, 1.25] about the mean, gamma
    [0.7, 1.5], brightness + [-0.25, 0.25] SD, Gaussian noise SD 0.1, resolution down to 0.5 x and back, a mirror
    along a random axis, rotation within 15 degrees, scale [0.85, 1.15]; each is applied with probability ``prob``.
    """
    _check_choice("augmentation", name, TRADITIONAL_AUGMENTATIONS)
    both, nearest = ("image", "label"), ("bilinear", "nearest")
    factories = {
        "contrast": lambda: RandScaleIntensityFixedMeand("image", prob=prob, factors=0.25),
        "gamma": lambda: RandAdjustContrastd("image", prob=prob, gamma=(0.7, 1.5)),
        "brightness": lambda: RandShiftIntensityd("image", prob=prob, offsets=0.25),
        "noise": lambda: RandGaussianNoised("image", prob=prob, std=0.1),
        "resolution": lambda: RandSimulateLowResolutiond(
            "image", prob=prob, zoom_range=(0.5, 1.0), upsample_mode="bilinear"
        ),
        "mirror": lambda: RandAxisFlipd(both, prob=prob),
        "rotate": lambda: RandRotated(both, range_x=math.radians(15), prob=prob, mode=nearest, padding_mode="zeros"),
        "scale": lambda: RandZoomd(
            both, prob=prob, min_zoom=0.85, max_zoom=1.15, mode=nearest, padding_mode="constant"
        ),
    }
    transform = Compose([factories[name]()])
    transform.set_random_state(seed=seed)
    return transform


def _augment_batch(
    transform: Compose, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transform`` applied to each sample of ``images [B, 1, X, Y]`` and class maps ``targets [B, 1, X, Y]``."""
    samples = [transform({"image": image, "label": target}) for image, target in zip(images, targets)]
    return (
        torch.stack([convert_to_tensor(s["image"], dtype=torch.float32, track_meta=False) for s in samples]),
        torch.stack([convert_to_tensor(s["label"], track_meta=False).round().long() for s in samples]),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Items


def items_for_contrast(entries: Sequence[Mapping], contrast: str) -> list[dict]:
    """Items with ``"image"`` set to one contrast's file, from datalist entries holding one file per contrast (the
    demo data's ``datalist_2d.json``: ``"label"``, ``"t1"``, ``"t2"``, ``"flair"``, ``"subject"``, ``"slice_index"``).

    Raises:
        ValueError: an entry has no ``contrast`` key.
    """
    items = []
    for index, entry in enumerate(entries):
        if contrast not in entry:
            raise ValueError(f"entry {index} has no '{contrast}' image; it has {sorted(entry)}.")
        items.append({**entry, "image": entry[contrast]})
    return items


def group_by_subject(items: Sequence[Mapping], subject_key: str = "subject") -> dict[str, list[Mapping]]:
    """Items grouped per subject, subjects in order of first appearance, items in their given order.

    Raises:
        ValueError: an item has no ``subject_key``.
    """
    subjects: dict[str, list[Mapping]] = {}
    for index, item in enumerate(items):
        if subject_key not in item:
            raise ValueError(
                f"item {index} has no '{subject_key}' key, needed to stack slices per subject; it has {sorted(item)}."
            )
        subjects.setdefault(str(item[subject_key]), []).append(item)
    return subjects


def _describe(item: Mapping, where: str) -> str:
    """``where`` plus what identifies the item to a person: its subject and slice, or its files."""
    if "subject" in item:
        slice_part = f", slice {item['slice_index']}" if "slice_index" in item else ""
        return f"{where} (subject '{item['subject']}'{slice_part})"
    files = [
        f"{key} '{os.fspath(item[key])}'" for key in ("image", "label") if isinstance(item.get(key), (str, os.PathLike))
    ]
    return f"{where} ({', '.join(files)})" if files else f"{where} (in memory)"


def _check_class_channels(class_channels: Sequence[int], merge_into: MergeRule) -> tuple[tuple[int, ...], dict | int]:
    """Validate the class definition; return the channels as a tuple and ``merge_into`` with int keys."""
    class_channels = tuple(int(c) for c in class_channels)
    if len(class_channels) < 2:
        raise ValueError(
            f"class_channels must list at least 2 label channels (background first), got {list(class_channels)}."
        )
    if len(set(class_channels)) != len(class_channels) or min(class_channels) < 0:
        raise ValueError(f"class_channels must be distinct channel indices >= 0, got {list(class_channels)}.")
    if isinstance(merge_into, Mapping):
        # JSON configs give mapping keys as strings
        merge_into = {int(channel): int(into) for channel, into in merge_into.items()}
        targets, kept = set(merge_into.values()), sorted(set(merge_into) & set(class_channels))
        if kept:
            raise ValueError(
                f"merge_into maps channel(s) {kept}, which are kept in class_channels {list(class_channels)}."
            )
    else:
        merge_into, targets = int(merge_into), {int(merge_into)}
    outside = sorted(targets - set(class_channels))
    if outside:
        raise ValueError(
            f"merge_into must name kept channels (class_channels {list(class_channels)}), got channel(s) {outside}."
        )
    return class_channels, merge_into


def merge_label_channels(label: torch.Tensor, class_channels: Sequence[int], merge_into: MergeRule) -> torch.Tensor:
    """Reduce a soft label map to the kept classes, adding every other channel's probability to a kept one.

    Args:
        label: probabilities ``[C, *spatial]``, channel-first.
        class_channels: label channels kept as classes, in class order (the first is the background).
        merge_into: the kept channel every other channel is added to (e.g. ``3``, white matter, for the demo data's
            lesions), or ``{dropped channel: kept channel}`` covering every dropped channel (e.g. WMH into white
            matter, tumour channels into an "other" class).

    Returns:
        ``[len(class_channels), *spatial]``, classes in the order of ``class_channels``.

    Raises:
        ValueError: the label has too few channels for ``class_channels``, or a dropped channel has no rule.
    """
    class_channels, merge_into = _check_class_channels(class_channels, merge_into)
    num_channels = label.shape[0]
    if num_channels <= max(class_channels):
        raise ValueError(
            f"the label has {num_channels} channels but class_channels {list(class_channels)} needs channel "
            f"{max(class_channels)}."
        )
    dropped = [c for c in range(num_channels) if c not in class_channels]
    rules = dict.fromkeys(dropped, merge_into) if isinstance(merge_into, int) else merge_into
    unruled = [c for c in dropped if c not in rules]
    if unruled:
        raise ValueError(f"merge_into gives no kept channel for label channel(s) {unruled}; map every dropped channel.")
    merged = label[list(class_channels)].clone()
    for channel in dropped:
        merged[class_channels.index(rules[channel])] += label[channel]
    return merged


@functools.lru_cache(maxsize=1)
def _image_loader() -> LoadImage:
    return LoadImage(image_only=True)


def load_array(value: Any, key: str = "image") -> np.ndarray:
    """The array behind a path (read with MONAI's ``LoadImage``; a missing, corrupt or non-finite file raises
    :class:`~medgen_common.transforms.ImageFileError` naming ``key`` and the file) or an in-memory array / tensor,
    as float32."""
    if isinstance(value, (str, os.PathLike)):
        value = read_image_file(_image_loader(), os.fspath(value), key)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def squeeze_slice(image: np.ndarray) -> np.ndarray:
    """A 2D image stored with trailing singleton axes (``X x Y x 1``, or ``X x Y x 1 x 1`` as channel-last NIfTI) as
    ``X x Y``; other shapes are returned unchanged."""
    while image.ndim > 2 and image.shape[-1] == 1:
        image = image[..., 0]
    return image


def normalise_image(image: np.ndarray, normalisation: str = "zscore_nonzero") -> torch.Tensor:
    """A 2D image ``X x Y`` as a normalised ``[1, X, Y]`` float32 tensor (MONAI's ``NormalizeIntensity``).

    ``normalisation``: ``"zscore_nonzero"`` over the non-zero voxels (the outside stays 0), ``"zscore"`` over every
    voxel, ``"none"`` unchanged.
    """
    _check_choice("normalisation", normalisation, NORMALISATIONS)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32)[None].copy())
    if normalisation != "none":
        tensor = NormalizeIntensity(nonzero=normalisation == "zscore_nonzero")(tensor)
    return convert_to_tensor(tensor, dtype=torch.float32, track_meta=False)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


def _index_target(label: np.ndarray, class_channels: Sequence[int], merge_into: MergeRule, name: str) -> torch.Tensor:
    """Class positions ``[1, X, Y]`` (int64) of an index map ``X x Y``: kept values map to their position in
    ``class_channels``, other values to the position of their ``merge_into`` channel."""
    class_channels, merge_into = _check_class_channels(class_channels, merge_into)
    if (label < 0).any() or (label != np.round(label)).any():
        odd = label[(label < 0) | (label != np.round(label))][0]
        raise ValueError(
            f"{name}: label_format='index' needs non-negative integer class indices, found the value {odd:g}."
        )
    values = np.unique(label).astype(np.int64)
    lookup = np.zeros(int(values.max()) + 1, dtype=np.int64)
    for value in values.tolist():
        if value in class_channels:
            kept = value
        else:
            kept = merge_into if isinstance(merge_into, int) else merge_into.get(value)
        if kept is None:
            raise ValueError(
                f"{name}: merge_into gives no kept channel for label value {value}; map every dropped value."
            )
        lookup[value] = class_channels.index(kept)
    return torch.from_numpy(lookup[label.astype(np.int64)][None])


def load_slice(
    item: Mapping,
    class_channels: Sequence[int],
    merge_into: MergeRule,
    where: str = "item",
    label_format: str = "soft",
    normalisation: str = "zscore_nonzero",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one item as a segmentation sample: the normalised image and the class index of each voxel.

    Args:
        item: ``{"image": ..., "label": ...}``, see the module docstring for the layouts.
        class_channels: label channels (soft) or values (index) kept as classes, see :func:`merge_label_channels`.
        merge_into: where the other channels or values go, see :func:`merge_label_channels`.
        where: how error messages name the item, e.g. ``"training set 'synthetic' item 3"``.
        label_format: ``"soft"`` (channels-last probabilities) or ``"index"`` (integer class-index map).
        normalisation: ``"zscore_nonzero"``, ``"zscore"`` or ``"none"``, see :func:`normalise_image`.

    Returns:
        ``(image [1, X, Y] float32, target [1, X, Y] int64)``; the image normalised (default: z-scored over its
        non-zero voxels, MONAI's ``NormalizeIntensity(nonzero=True)``), the target the class position per voxel
        (the argmax of the merged soft label).

    Raises:
        ValueError: a key is missing, a layout or shape is wrong, the label has too few channels, an index label
            holds a negative or fractional value, or an array holds NaN or Inf; the message names the item.
    """
    _check_class_channels(class_channels, merge_into)
    _check_choice("label_format", label_format, LABEL_FORMATS)
    _check_choice("normalisation", normalisation, NORMALISATIONS)
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be a dict with 'image' and 'label', got {type(item).__name__}.")
    name = _describe(item, where)
    missing = [key for key in ("image", "label") if key not in item]
    if missing:
        raise ValueError(f"{name} misses key(s) {missing}; it has {sorted(item)}.")
    try:
        image, label = load_array(item["image"], "image"), load_array(item["label"], "label")
    except ImageFileError as err:
        raise ImageFileError(f"{name}: {err}") from err
    image = squeeze_slice(image)
    if image.ndim != 2:
        raise ValueError(f"{name}: the image must be one 2D slice, X x Y or X x Y x 1, got shape {image.shape}.")
    if label_format == "index":
        if label.ndim == 3 and label.shape[2] == 1:
            label = label[:, :, 0]
        if label.ndim != 2:
            raise ValueError(f"{name}: an index label must be X x Y or X x Y x 1, got shape {label.shape}.")
    else:
        if label.ndim == 4 and label.shape[2] == 1:
            label = label[:, :, 0]
        if label.ndim != 3:
            raise ValueError(
                f"{name}: the label must be a 2D soft map with channels last, X x Y x C or X x Y x 1 x C, got shape "
                f"{label.shape}."
            )
    if label.shape[:2] != image.shape:
        raise ValueError(f"{name}: label shape {label.shape} does not match image shape {image.shape}.")
    for key, array in (("image", image), ("label", label)):  # in-memory arrays; files are checked by load_array
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: the {key} contains NaN or Inf values.")
    if label_format == "index":
        target = _index_target(label, class_channels, merge_into, name)
    else:
        if label.shape[2] <= max(int(c) for c in class_channels):
            hint = " (a class-index map? pass label_format='index')" if label.shape[2] == 1 else ""
            raise ValueError(
                f"{name}: the label has {label.shape[2]} channels (last axis of shape {label.shape}), fewer than "
                f"class_channels {list(class_channels)} needs{hint}."
            )
        merged = merge_label_channels(torch.from_numpy(np.moveaxis(label, -1, 0).copy()), class_channels, merge_into)
        target = merged.argmax(dim=0, keepdim=True)
    return normalise_image(image, normalisation), target


def _load_training_set(
    items: Sequence[Mapping], class_channels: Sequence[int], merge_into: MergeRule, where: str, formats: Mapping
) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a training set as ``(images [N, 1, X, Y], targets [N, 1, X, Y])``; one shape for all.
    ``formats``: ``label_format`` and ``normalisation`` of :func:`load_slice`."""
    if len(items) == 0:
        raise ValueError(f"{where} is empty: a segmenter needs at least one training item.")
    images, targets = [], []
    for index, item in enumerate(items):
        image, target = load_slice(item, class_channels, merge_into, where=f"{where} item {index}", **formats)
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"{_describe(item, f'{where} item {index}')} has shape {tuple(image.shape[1:])}, but item 0 has "
                f"{tuple(images[0].shape[1:])}; training slices must share one shape."
            )
        images.append(image)
        targets.append(target)
    return torch.stack(images), torch.stack(targets)


def _load_partners(
    items: Sequence[Mapping], image_shape: Sequence[int], where: str, normalisation: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The synthetic counterparts of a patch-mixed training set: ``(images [M, 1, X, Y], owners)``, where
    ``owners[n]`` holds the indices of item ``n``'s counterparts among the ``M`` images."""
    images, owners = [], []
    for index, item in enumerate(items):
        name = _describe(item, f"{where} item {index}")
        partners = item.get(PARTNERS_KEY)
        if isinstance(partners, (str, os.PathLike)):
            partners = [partners]
        if not partners:
            raise ValueError(
                f"{name} has no '{PARTNERS_KEY}': patch mixing needs at least one synthetic image generated from "
                "each real item's label."
            )
        owners.append(torch.arange(len(images), len(images) + len(partners)))
        for partner in partners:
            image = load_array(partner, PARTNERS_KEY)
            image = squeeze_slice(image)
            if tuple(image.shape) != tuple(image_shape):
                raise ValueError(
                    f"{name}: its synthetic image has shape {image.shape}, the real one {tuple(image_shape)}."
                )
            if not np.isfinite(image).all():  # an in-memory array; files are checked by load_array
                raise ValueError(f"{name}: its synthetic image contains NaN or Inf values.")
            images.append(normalise_image(image, normalisation))
    return torch.stack(images), owners


def _check_patch_mixing(patch_mixing: Mapping[str, Mapping], train_sets: Mapping) -> None:
    for name, settings in patch_mixing.items():
        if name not in train_sets:
            raise ValueError(f"patch mixing names the training set '{name}', which is not among {list(train_sets)}.")
        missing = {"alpha", "patch_size"} - set(settings)
        if missing:
            raise ValueError(f"patch mixing of '{name}' misses {sorted(missing)}; give alpha and patch_size.")


def _load_volumes(
    volumes: Mapping[str, Sequence[Mapping]] | Sequence[Mapping],
    class_channels: Sequence[int],
    merge_into: MergeRule,
    formats: Mapping,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each subject's slices, ordered by ``"slice_index"``, as ``(images [Z, 1, X, Y], targets [X, Y, Z])``."""
    subjects = volumes if isinstance(volumes, Mapping) else group_by_subject(volumes)
    if len(subjects) == 0:
        raise ValueError("no test subjects to evaluate on.")
    loaded = {}
    for subject, items in subjects.items():
        if len(items) == 0:
            raise ValueError(f"test subject '{subject}' has no slices.")
        if len(items) > 1:
            unindexed = [index for index, item in enumerate(items) if "slice_index" not in item]
            if unindexed:
                raise ValueError(
                    f"test subject '{subject}': item(s) {unindexed} have no 'slice_index', needed to stack its "
                    f"{len(items)} slices in order."
                )
            indices = [int(item["slice_index"]) for item in items]
            repeated = sorted({i for i in indices if indices.count(i) > 1})
            if repeated:
                raise ValueError(f"test subject '{subject}' has several slices with slice_index {repeated}.")
            items = [items[i] for i in np.argsort(indices, kind="stable")]
        # items that carry their subject name it themselves (see _describe)
        slices = [
            load_slice(
                item, class_channels, merge_into,
                where="test item" if "subject" in item else f"'{subject}' item", **formats,
            )  # fmt: skip
            for item in items
        ]
        shapes = {tuple(image.shape) for image, _ in slices}
        if len(shapes) > 1:
            raise ValueError(f"test subject '{subject}' has slices of different shapes {sorted(shapes)}.")
        images = torch.stack([image for image, _ in slices])
        targets = torch.cat([target for _, target in slices]).permute(1, 2, 0)
        loaded[subject] = (images, targets)
    return loaded


# ---------------------------------------------------------------------------------------------------------------------
# Training


def _train(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | torch.device,
    channels: Sequence[int],
    network: torch.nn.Module | None,
    progress: bool,
    description: str,
    mixing: tuple[torch.Tensor, list[torch.Tensor], Mapping] | None = None,
    architecture: str = "unet",
    augmentation: str | None = None,
) -> torch.nn.Module:
    """Train on preloaded ``images [N, 1, X, Y]`` and ``targets [N, 1, X, Y]``; see :func:`train_segmenter`.
    ``mixing``: ``(partner images, owners, {"alpha", "patch_size"})`` from :func:`_load_partners` for patch mixing;
    ``augmentation``: one of :data:`TRADITIONAL_AUGMENTATIONS`, applied to every drawn slice."""
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size} and {lr}.")
    device = select_device(str(device))
    # the initial weights depend on the seed only; the caller's global random state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = SliceSegmenter(num_classes, channels, architecture=architecture) if network is None else network
    network = network.to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    # batch=True: Dice over the whole batch, so a class absent from one slice does not make its loss undefined
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    generator = torch.Generator().manual_seed(seed)
    augment = None if augmentation is None else traditional_augmentation(augmentation, seed=seed)
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(total=steps, desc=description, leave=False) if progress else None
    for _ in range(steps):
        # epochs of random permutations, so every item is seen once before any is seen twice
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(images.shape[0], generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        inputs, batch_targets = images[batch], targets[batch]
        if mixing is not None:
            partners, owners, settings = mixing
            chosen = torch.cat([owners[i][torch.randint(len(owners[i]), (1,), generator=generator)] for i in batch])
            inputs = patch_mix(inputs, partners[chosen], settings["alpha"], settings["patch_size"], generator)
        if augment is not None:
            inputs, batch_targets = _augment_batch(augment, inputs, batch_targets)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(network(inputs.to(device)), batch_targets.to(device))
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return network.eval()


def train_segmenter(
    items: Sequence[Mapping],
    class_channels: Sequence[int],
    merge_into: MergeRule,
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels: Sequence[int] = (8, 16, 32, 64),
    network: torch.nn.Module | None = None,
    progress: bool = False,
    label_format: str = "soft",
    normalisation: str = "zscore_nonzero",
    patch_mixing: Mapping | None = None,
    architecture: str = "unet",
    augmentation: str | None = None,
) -> torch.nn.Module:
    """Train a 2D segmenter on ``items`` with Dice + cross-entropy (MONAI ``DiceCELoss``) and Adam.

    Every item is loaded once (:func:`load_slice`); each step draws ``batch_size`` slices from a seeded shuffle.
    The same items, settings and seed give the same weights on CPU.

    Args:
        items: training items ``{"image", "label"}``, all slices of one shape.
        class_channels: label channels kept as classes (background first); ``len(class_channels)`` is the number of
            classes the network predicts.
        merge_into: where the other label channels go, see :func:`merge_label_channels`.
        steps: optimiser steps.
        batch_size: slices per step.
        lr: Adam learning rate.
        seed: seed of the initial weights and of the batch order.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        channels: feature channels per level of the default :class:`SliceSegmenter`.
        network: a network to train instead, mapping ``[B, 1, X, Y]`` to logits ``[B, len(class_channels), X, Y]``;
            its initial weights are the caller's.
        progress: show a progress bar with the loss.
        label_format, normalisation: how labels are stored and images normalised, see :func:`load_slice`.
        patch_mixing: ``{"alpha", "patch_size"}``: mix every slice patch-wise with one of its item's
            ``"synthetic_images"`` at each step (EMIT-Diff; ``alpha`` is the probability of a real patch).
        architecture: ``"unet"`` or ``"attention_unet"`` for the default :class:`SliceSegmenter`.
        augmentation: one of :data:`TRADITIONAL_AUGMENTATIONS` applied to every drawn slice, or None.

    Returns:
        The trained network, in eval mode, on ``device``.

    Raises:
        ValueError: ``items`` is empty, or an item is invalid (see :func:`load_slice`).
    """
    formats = {"label_format": label_format, "normalisation": normalisation}
    images, targets = _load_training_set(items, class_channels, merge_into, "training set", formats)
    mixing = None
    if patch_mixing is not None:
        _check_patch_mixing({"training set": patch_mixing}, {"training set": items})
        mixing = (*_load_partners(items, images.shape[2:], "training set", normalisation), patch_mixing)
    return _train(
        images, targets, len(class_channels), steps, batch_size, lr, seed, device, channels, network, progress,
        description="segmenter", mixing=mixing, architecture=architecture, augmentation=augmentation,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def _predict(network: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class index of every voxel of ``images [Z, 1, X, Y]``, as ``[X, Y, Z]``."""
    was_training = network.training
    network.eval()
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        predictions = [
            network(images[start : start + batch_size].to(device)).argmax(dim=1).cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    network.train(was_training)
    return torch.cat(predictions).permute(1, 2, 0)


def predict_subject(
    network: torch.nn.Module,
    items: Sequence[Mapping],
    class_channels: Sequence[int],
    merge_into: MergeRule,
    batch_size: int = 64,
    label_format: str = "soft",
    normalisation: str = "zscore_nonzero",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict every slice of one subject and stack predictions and targets into volumes.

    Args:
        network: maps ``[B, 1, X, Y]`` to logits ``[B, len(class_channels), X, Y]``.
        items: the subject's slices, in any order; each needs ``"slice_index"`` when there are several.
        class_channels, merge_into: the classes, see :func:`merge_label_channels`.
        batch_size: slices per forward pass.
        label_format, normalisation: see :func:`load_slice`.

    Returns:
        ``(prediction, target)``, class indices ``[X, Y, Z]`` (int64), slices along the last axis in increasing
        ``slice_index``.
    """
    subject = str(items[0].get("subject", "subject")) if len(items) else "subject"
    formats = {"label_format": label_format, "normalisation": normalisation}
    ((images, targets),) = _load_volumes({subject: list(items)}, class_channels, merge_into, formats).values()
    return _predict(network, images, batch_size), targets


def _volume_scores(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, include_background: bool
) -> dict[str, torch.Tensor]:
    """Dice, precision, recall, HD95 and ASSD (voxels) per class of class-index maps ``[X, Y, Z]`` (or one image
    ``[X, Y]``)."""
    pred_one_hot = one_hot(prediction[None, None], num_classes=num_classes)
    target_one_hot = one_hot(target[None, None], num_classes=num_classes)
    hd95, assd = surface_distances_per_class(pred_one_hot, target_one_hot, include_background)
    precision, recall = precision_recall_per_class(pred_one_hot, target_one_hot, include_background)
    dice = dice_per_class(pred_one_hot, target_one_hot, include_background=include_background)
    return {"dice": dice[0], "precision": precision[0], "recall": recall[0], "hd95": hd95[0], "assd": assd[0]}


def _class_names(class_channels: Sequence[int], class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"class_{i}" for i in range(len(class_channels))]
    if len(class_names) != len(class_channels):
        raise ValueError(
            f"class_names has {len(class_names)} names for {len(class_channels)} class_channels: {list(class_names)}."
        )
    return list(class_names)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _subject_scores(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, include_background: bool, per_image: bool
) -> dict[str, torch.Tensor]:
    """:func:`_volume_scores` of a subject's stacked slices ``[X, Y, Z]``, or with ``per_image`` the mean over its
    2D images (NaN where a class is absent from an image is left out)."""
    if not per_image:
        return _volume_scores(prediction, target, num_classes, include_background)
    images = [
        _volume_scores(prediction[..., z], target[..., z], num_classes, include_background)
        for z in range(prediction.shape[-1])
    ]
    return {metric: torch.stack([scores[metric] for scores in images]).nanmean(0) for metric in SCORES}


def _evaluate_loaded(
    network: torch.nn.Module,
    volumes: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[str],
    include_background: bool,
    batch_size: int,
    per_image: bool = False,
) -> dict[str, dict]:
    scored = names if include_background else names[1:]
    per_subject = {metric: {} for metric in SCORES}
    for subject, (images, targets) in volumes.items():
        prediction = _predict(network, images, batch_size)
        scores = _subject_scores(prediction, targets, len(names), include_background, per_image)
        for metric, values in scores.items():
            per_subject[metric][subject] = {name: float(value) for name, value in zip(scored, values)}
    mean = {
        metric: {name: _nanmean([scores[name] for scores in subjects.values()]) for name in scored}
        for metric, subjects in per_subject.items()
    }
    return {
        "per_subject": per_subject["dice"], "mean": mean["dice"],
        **{f"per_subject_{m}": per_subject[m] for m in SCORES[1:]},
        **{f"mean_{m}": mean[m] for m in SCORES[1:]},
    }  # fmt: skip


def evaluate_segmenter(
    network: torch.nn.Module,
    volumes: Mapping[str, Sequence[Mapping]] | Sequence[Mapping],
    class_channels: Sequence[int],
    merge_into: MergeRule,
    class_names: Sequence[str] | None = None,
    include_background: bool = False,
    batch_size: int = 64,
    label_format: str = "soft",
    normalisation: str = "zscore_nonzero",
    per_image: bool = False,
) -> dict[str, dict]:
    """Dice per class and subject in 3D: each subject's slices are predicted and stacked by ``"slice_index"``
    (``per_image``: scored one 2D image at a time and averaged per subject, for images that are not slices of one
    volume, such as ultrasound frames).

    Args:
        network: maps ``[B, 1, X, Y]`` to logits ``[B, len(class_channels), X, Y]``.
        volumes: ``{subject: items}``, or a flat list of items grouped by their ``"subject"`` key.
        class_channels, merge_into: the classes, see :func:`merge_label_channels`.
        class_names: a name per class, e.g. ``["background", "csf", "gm", "wm"]``; default ``class_0``, ...
        include_background: also score the first class.
        batch_size: slices per forward pass.
        label_format, normalisation: see :func:`load_slice`.

    Returns:
        ``{"per_subject": {subject: {class name: Dice}}, "mean": {class name: mean Dice over subjects}}``, and the
        same for precision, recall and the 95th-percentile Hausdorff and average symmetric surface distances in
        voxels (``"per_subject_precision"``, ``"mean_precision"``, ..., ``"mean_assd"``). A class absent from both a
        subject's prediction and target is NaN for that subject and left out of the mean; present in only one, its
        distances are the volume diagonal (see :func:`metrics.surface_distances_per_class`) and its precision or
        recall 0.
    """
    names = _class_names(class_channels, class_names)
    formats = {"label_format": label_format, "normalisation": normalisation}
    loaded = _load_volumes(volumes, class_channels, merge_into, formats)
    return _evaluate_loaded(network, loaded, names, include_background, batch_size, per_image)


# ---------------------------------------------------------------------------------------------------------------------
# Comparison of training sets


def compare_training_sets(
    train_sets: Mapping[str, Sequence[Mapping]],
    test_items: Mapping[str, Sequence[Mapping]] | Sequence[Mapping],
    class_channels: Sequence[int],
    merge_into: MergeRule,
    class_names: Sequence[str] | None = None,
    reference: str = "real",
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels: Sequence[int] = (8, 16, 32, 64),
    include_background: bool = False,
    progress: bool = False,
    label_format: str = "soft",
    normalisation: str = "zscore_nonzero",
    patch_mixing: Mapping[str, Mapping] | None = None,
    per_image: bool = False,
    architecture: str = "unet",
    augmentations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Train one segmenter per training set, with the same seed and steps, and score each on the same test subjects.

    Every training set and the test subjects are loaded and checked before any training starts.

    Args:
        train_sets: ``{name: items}``, e.g. ``{"real": ..., "synthetic": ..., "real+synthetic": ...}``.
        test_items: real test slices, ``{subject: items}`` or a flat list with ``"subject"`` and ``"slice_index"``.
        class_channels, merge_into: the classes, see :func:`merge_label_channels`.
        class_names: a name per class; default ``class_0``, ...
        reference: the training set the others are compared with.
        steps, batch_size, lr, seed, device, channels, architecture: training settings, see :func:`train_segmenter`.
        include_background: also score the first class.
        progress: show a progress bar per training set.
        label_format, normalisation: see :func:`load_slice`; the same for training and test items.
        patch_mixing: ``{set name: {"alpha", "patch_size"}}``: those sets are trained with EMIT-Diff's patch mixing
            of each item with one of its ``"synthetic_images"`` (``alpha``: the probability of a real patch).
        per_image: score each test image in 2D and average per subject, see :func:`evaluate_segmenter`.
        augmentations: ``{set name: one of TRADITIONAL_AUGMENTATIONS}``: those sets are trained with it.

    Returns:
        :func:`summarise_comparison` of the per-subject scores.

    Raises:
        ValueError: no training sets, ``reference`` is not one of them, a set is empty, an item is invalid, or a
            mixing or augmentation setting names an unknown set or augmentation.
    """
    if len(train_sets) == 0:
        raise ValueError("train_sets is empty: name at least one training set.")
    if reference not in train_sets:
        raise ValueError(f"reference training set '{reference}' is not among the training sets {list(train_sets)}.")
    patch_mixing, augmentations = dict(patch_mixing or {}), dict(augmentations or {})
    _check_patch_mixing(patch_mixing, train_sets)
    for name, augmentation in augmentations.items():
        if name not in train_sets:
            raise ValueError(f"augmentations name the training set '{name}', which is not among {list(train_sets)}.")
        _check_choice(f"the augmentation of '{name}'", augmentation, TRADITIONAL_AUGMENTATIONS)
    _check_choice("architecture", architecture, ARCHITECTURES)
    names = _class_names(class_channels, class_names)
    formats = {"label_format": label_format, "normalisation": normalisation}
    loaded_sets = {
        name: _load_training_set(items, class_channels, merge_into, f"training set '{name}'", formats)
        for name, items in train_sets.items()
    }
    mixing = {
        name: (*_load_partners(train_sets[name], loaded_sets[name][0].shape[2:], f"training set '{name}'",
                               normalisation), settings)
        for name, settings in patch_mixing.items()
    }  # fmt: skip
    volumes = _load_volumes(test_items, class_channels, merge_into, formats)
    per_subject = {}
    for name, (images, targets) in loaded_sets.items():
        network = _train(
            images, targets, len(class_channels), steps, batch_size, lr, seed, device, channels, None, progress,
            description=name, mixing=mixing.get(name), architecture=architecture,
            augmentation=augmentations.get(name),
        )  # fmt: skip
        scores = _evaluate_loaded(network, volumes, names, include_background, batch_size=64, per_image=per_image)
        per_subject[name] = {"dice": scores["per_subject"], **{m: scores[f"per_subject_{m}"] for m in SCORES[1:]}}
    num_items = {name: len(items) for name, items in train_sets.items()}
    return summarise_comparison(per_subject, reference, num_items, seed)


def summarise_comparison(
    per_subject: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    reference: str,
    num_items: Mapping[str, int],
    seed: int = 0,
) -> dict[str, Any]:
    """Means, ratios and bootstrap CIs of per-subject scores of several training sets scored on the same subjects.

    Args:
        per_subject: ``{set: {"dice"|"precision"|"recall"|"hd95"|"assd": {subject: {class: value}}}}``.
        reference: the set the others are compared with.
        num_items: training items per set.
        seed: seed of the bootstrap.

    Returns:
        ``{"reference": name, "mean_dice": {set: {class: Dice}}, "ratio_to_reference": {set: {class: Dice / the
        reference's Dice}}, "per_subject": {set: {subject: {class: Dice}}}, "num_items": {set: count}}``; a ratio is
        NaN where the reference's Dice is 0 or NaN. Also ``"per_subject_metrics"`` (``{set: {"precision"|"recall"|
        "hd95"|"assd": {subject: {class: value}}}}``, distances in voxels), ``"confidence_intervals"`` (``{set:
        {metric: {class: mean and 95 % CI}}}``, a bootstrap over test subjects) and
        ``"dice_difference_to_reference"`` (``{set: {class: paired Dice difference to the reference with its CI}}``).
    """
    dice = {name: scores["dice"] for name, scores in per_subject.items()}
    mean_dice = {
        name: {cls: _nanmean([scores[cls] for scores in subjects.values()]) for cls in next(iter(subjects.values()))}
        for name, subjects in dice.items()
    }
    reference_dice = mean_dice[reference]
    ratios = {
        name: {
            cls: value / reference_dice[cls] if reference_dice[cls] > 0 else math.nan for cls, value in scores.items()
        }
        for name, scores in mean_dice.items()
    }
    classes = list(reference_dice)

    def per_class(subjects: Mapping[str, Mapping[str, float]], cls: str) -> dict[str, float]:
        return {subject: scores[cls] for subject, scores in subjects.items()}

    confidence = {
        name: {
            metric: {c: bootstrap_mean_ci(list(per_class(subjects, c).values()), seed=seed) for c in classes}
            for metric, subjects in scores.items()
        }
        for name, scores in per_subject.items()
    }
    dice_difference = {
        name: {
            c: bootstrap_difference_ci(per_class(dice[name], c), per_class(dice[reference], c), seed=seed)
            for c in classes
        }
        for name in per_subject
        if name != reference
    }
    return {
        "reference": reference,
        "mean_dice": mean_dice,
        "ratio_to_reference": ratios,
        "per_subject": dice,
        "per_subject_metrics": {
            name: {m: values for m, values in scores.items() if m != "dice"} for name, scores in per_subject.items()
        },
        "confidence_intervals": confidence,
        "dice_difference_to_reference": dice_difference,
        "num_items": dict(num_items),
    }


def combine_folds(folds: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Results of :func:`compare_training_sets` on the folds of a cross-validation, as one result over every test
    subject (each tested once, by the fold that held it out); ``"num_items"`` lists each set's size per fold and
    ``"folds"`` keeps the fold results.

    Raises:
        ValueError: no folds, folds that compare different sets, or a subject tested in two folds.
    """
    if len(folds) == 0:
        raise ValueError("combine_folds needs at least one fold.")
    sets = list(folds[0]["per_subject"])
    for index, fold in enumerate(folds):
        if list(fold["per_subject"]) != sets:
            raise ValueError(f"fold {index} compares {list(fold['per_subject'])}, fold 0 {sets}.")
    seen: dict[str, int] = {}
    for index, fold in enumerate(folds):
        for subject in fold["per_subject"][sets[0]]:
            if subject in seen:
                raise ValueError(f"subject '{subject}' is tested in folds {seen[subject]} and {index}.")
            seen[subject] = index
    metrics = list(folds[0]["per_subject_metrics"][sets[0]])

    def gathered(name: str, metric: str) -> dict[str, dict[str, float]]:
        merged = {}
        for fold in folds:
            merged.update(fold["per_subject"][name] if metric == "dice" else fold["per_subject_metrics"][name][metric])
        return merged

    per_subject = {name: {metric: gathered(name, metric) for metric in ("dice", *metrics)} for name in sets}
    num_items = {name: [fold["num_items"][name] for fold in folds] for name in sets}
    return {**summarise_comparison(per_subject, folds[0]["reference"], num_items, seed), "folds": folds}


def format_table(results: Mapping[str, Any], digits: int = 3) -> str:
    """The result of :func:`compare_training_sets` as a caption line and a Markdown table: a row per training set, a
    column per class holding the mean Dice and, in brackets, its ratio to the reference set. The layout (numbers
    made up)::

        Mean Dice over test subjects (ratio to 'real').

        | training set | items | csf          | gm           | wm           |
        | ------------ | ----- | ------------ | ------------ | ------------ |
        | real         | 96    | 0.812 (1.00) | 0.874 (1.00) | 0.901 (1.00) |
        | synthetic    | 96    | 0.774 (0.95) | 0.861 (0.99) | 0.897 (1.00) |
    """
    mean_dice, ratios = results["mean_dice"], results["ratio_to_reference"]
    classes = list(next(iter(mean_dice.values())))
    header = ["training set", "items", *classes]
    rows = [
        [name, _items(results, name), *(f"{scores[c]:.{digits}f} ({ratios[name][c]:.2f})" for c in classes)]
        for name, scores in mean_dice.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    caption = f"Mean Dice over test subjects (ratio to '{results['reference']}')."
    return "\n".join([caption, "", line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def _items(results: Mapping[str, Any], name: str) -> str:
    """A set's training items: a count, or the counts per fold joined by " / "."""
    count = results.get("num_items", {}).get(name, "")
    return " / ".join(str(n) for n in count) if isinstance(count, (list, tuple)) else str(count)


def _class_mean_per_subject(subjects: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {subject: _nanmean(list(scores.values())) for subject, scores in subjects.items()}


def format_summary_table(results: Mapping[str, Any], digits: int = 3, seed: int = 0) -> str:
    """The result of :func:`compare_training_sets` (or :func:`combine_folds`) as one row per training set, the
    columns of EMIT-Diff's Table 2: Dice, precision, recall, HD95 and ASSD (voxels), each averaged over the classes
    per test subject, then over subjects, with a 95 % bootstrap CI over subjects, and the paired Dice difference to
    the reference set with its CI."""
    reference = results["reference"]
    dice = {name: _class_mean_per_subject(subjects) for name, subjects in results["per_subject"].items()}
    others = {
        name: {m: _class_mean_per_subject(subjects) for m, subjects in results["per_subject_metrics"][name].items()}
        for name in dice
    }

    def cell(ci: Mapping) -> str:
        if not math.isfinite(ci["mean"]):
            return "n/a"
        return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"

    def mean_cell(scores: Mapping[str, float]) -> str:
        return cell(bootstrap_mean_ci(list(scores.values()), seed=seed))

    columns = [m for m in SCORES[1:] if m in others[reference]]
    titles = {"precision": "Precision", "recall": "Recall", "hd95": "HD95 (voxels)", "assd": "ASSD (voxels)"}
    folds = f" ({len(results['folds'])}-fold cross-validation, each subject tested once)" if "folds" in results else ""
    lines = [
        f"Mean over classes, then over the {len(dice[reference])} test subjects{folds}; 95 % bootstrap CIs over "
        "subjects.",
        "",
        f"| training set | items | Dice | ΔDice vs {reference} | {' | '.join(titles[m] for m in columns)} |",
        "| --- | --- | --- | --- |" + " --- |" * len(columns),
    ]
    for name, subjects in dice.items():
        delta = "–" if name == reference else cell(bootstrap_difference_ci(subjects, dice[reference], seed=seed))
        cells = [
            name,
            _items(results, name),
            mean_cell(subjects),
            delta,
            *(mean_cell(others[name][m]) for m in columns),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
