"""Context selection of CSG (paper §2.1.1): each training image is paired with the most similar *other* image in
Gatys style space, which becomes its context (texture) condition.

Style descriptor (Gatys et al. 2016): for each chosen layer ``l`` of a frozen CNN with feature maps ``F_l``
``[B, C_l, *spatial]`` and ``M_l`` positions, the Gram matrix ``G_l = F_l F_l^T / M_l`` ``[B, C_l, C_l]``, flattened
and divided by ``C_l``, so that the squared distance between two descriptors is the sum over layers of the mean
squared Gram difference: Gatys' style loss with equal layer weights, up to a constant factor. The MSE between
descriptors then ranks candidate contexts (:func:`select_context`).

Feature networks, all returning a list of feature maps:

- :class:`RandomFeatureGramDescriptor`: the offline default, a fixed, seeded, randomly initialised VGG-like conv
  pyramid. Random-filter CNNs are an established texture descriptor (Ustyuzhaninov et al., "What does it take to
  generate natural textures?", ICLR 2017); it is *not* the paper's ImageNet CNN.
- :class:`VGG19Features` loaded with :func:`load_style_network`: the paper's ImageNet-pretrained CNN (Gatys' VGG-19
  conv1_1 ... conv5_1), read only from a local file; nothing is downloaded.
- any user module, e.g. :class:`BlockFeatures` over ``autoencoder.encoder.blocks`` of the bundle's own trained
  ``AutoencoderKL`` (the "frozen encoder" of paper §2.3.2), wrapped in :class:`GramDescriptor`.

:func:`make_context_datalist` turns a MONAI datalist into (mask, context) -> image pairs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from monai.transforms import LoadImage
from torch import nn

from .metrics import load_feature_extractor
from .writers import read_json, write_json

__all__ = [
    "gram_matrix",
    "GramDescriptor",
    "RandomFeatureGramDescriptor",
    "BlockFeatures",
    "VGG19Features",
    "GATYS_STYLE_LAYERS",
    "load_style_network",
    "compute_style_descriptors",
    "ContextSelection",
    "select_context",
    "load_grey_image",
    "make_context_datalist",
]

#: VGG-19 layers of Gatys et al. (2016) style representation.
GATYS_STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")

# torchvision's VGG-19 ("E") trunk: conv widths, "M" a 2x2 max pool
_VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix per image, normalised by the number of positions: ``[B, C, *spatial] -> [B, C, C]``."""
    if features.ndim < 3:
        raise ValueError(f"feature maps must be [B, C, *spatial], got shape {tuple(features.shape)}.")
    flat = features.flatten(start_dim=2).float()
    return flat @ flat.transpose(1, 2) / flat.shape[2]


class GramDescriptor(nn.Module):
    """Style descriptor ``[B, D]`` of images from the Gram matrices of a frozen feature network.

    Each layer's Gram matrix (:func:`gram_matrix`) is flattened and divided by its channel count ``C_l`` (equal
    layer weights: the squared descriptor distance is the sum over layers of the mean squared Gram difference),
    then the layers are concatenated; ``D = sum_l C_l^2``.

    Args:
        feature_network: module mapping images ``[B, C, H, W]`` (as it expects them; ``[B, 1, H, W]`` in [0, 1] for
            the networks of this module) to a list of feature maps ``[B, C_l, H_l, W_l]``. It is frozen in place.
        log_scale: apply ``sign(g) * log1p(|g|)`` to every Gram entry, which compresses the range of large entries
            (bright, high-contrast images) so that they do not dominate the distance.
    """

    def __init__(self, feature_network: nn.Module, log_scale: bool = False):
        super().__init__()
        self.feature_network = feature_network.eval()
        for parameter in self.feature_network.parameters():
            parameter.requires_grad_(False)
        self.log_scale = log_scale

    def train(self, mode: bool = True) -> GramDescriptor:
        return super().train(False)  # always frozen

    @torch.no_grad()
    def layer_grams(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer flattened, weighted Gram matrices ``[B, C_l^2]`` of ``images``."""
        feature_maps = self.feature_network(images)
        if isinstance(feature_maps, torch.Tensor) or len(feature_maps) == 0:
            raise ValueError(
                "the feature network of a GramDescriptor must return a non-empty list of feature maps "
                f"[B, C_l, *spatial], got {type(feature_maps).__name__}."
            )
        blocks = []
        for features in feature_maps:
            gram = gram_matrix(features)
            if self.log_scale:
                gram = gram.sign() * gram.abs().log1p()
            blocks.append(gram.flatten(start_dim=1) / gram.shape[1])
        return blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors ``[B, D]`` of images ``[B, C, H, W]``."""
        return torch.cat(self.layer_grams(images), dim=1)


class BlockFeatures(nn.Module):
    """Run ``blocks`` in sequence and return every block's output, e.g. the encoder blocks of a MONAI
    ``AutoencoderKL`` (``BlockFeatures(autoencoder.encoder.blocks)``); the blocks are shared, not copied."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class RandomFeatureGramDescriptor(GramDescriptor):
    """Gram descriptor of a fixed, seeded, randomly initialised VGG-like conv pyramid: the honest offline default.

    Level ``i`` is a 2x2 max pool (from the second level on), a stride-1 3x3 convolution to ``channels[i]`` and a
    LeakyReLU(0.2); the Gram matrices of every level form the descriptor (``D = sum(c^2 for c in channels)``).
    Images in [0, 1] are shifted by -0.5 first (a fixed offset, like VGG's mean subtraction, so gain differences
    still count). Stride-1 convolutions matter: the strided pyramid of
    :class:`~medgen_common.metrics.RandomFeatureExtractor` aliases fine textures, so the descriptor of a stripe
    pattern would depend on its phase. Weights depend only on ``seed`` (the global random state is untouched). It
    is not an ImageNet CNN: use :func:`load_style_network` for the paper's descriptor when local weights exist.

    Args:
        in_channels: image channels (1 for ultrasound).
        channels: output channels of each level.
        seed: seed of the weights.
        log_scale: see :class:`GramDescriptor`.
    """

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64), seed: int = 0, log_scale: bool = False
    ):
        generator = torch.Generator().manual_seed(seed)
        levels = []
        with torch.random.fork_rng(devices=[]):  # the default initialisation would draw from the global RNG
            for index, (c_in, c_out) in enumerate(zip((in_channels, *channels[:-1]), channels)):
                conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
                nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu", generator=generator)
                nn.init.normal_(conv.bias, std=0.1, generator=generator)
                pool = [nn.MaxPool2d(2)] if index > 0 else []
                levels.append(nn.Sequential(*pool, conv, nn.LeakyReLU(0.2)))
        super().__init__(BlockFeatures(levels), log_scale=log_scale)

    def layer_grams(self, images: torch.Tensor) -> list[torch.Tensor]:
        return super().layer_grams(images - 0.5)


class VGG19Features(nn.Module):
    """The VGG-19 convolutional trunk in torchvision's layout (state-dict keys ``features.N.weight``), returning the
    ReLU outputs of ``layers`` (default Gatys' conv1_1 ... conv5_1).

    Grey images ``[B, 1, H, W]`` in [0, 1] are repeated to RGB; RGB images ``[B, 3, H, W]`` in [0, 1] pass as they
    are; both are normalised with the ImageNet mean and standard deviation. The trunk is built only up to the
    deepest requested layer. Random weights until loaded with :func:`load_style_network`.
    """

    def __init__(self, layers: Sequence[str] = GATYS_STYLE_LAYERS):
        super().__init__()
        positions, modules, block, conv_in_block, in_channels = {}, [], 1, 0, 3
        for width in _VGG19_CONFIG:
            if width == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
                block, conv_in_block = block + 1, 0
                continue
            conv_in_block += 1
            positions[f"conv{block}_{conv_in_block}"] = len(modules) + 1  # index of the conv's ReLU
            modules += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = width
        unknown = [name for name in layers if name not in positions]
        if unknown or not layers:
            raise ValueError(f"VGG-19 layers must be a non-empty subset of {list(positions)}, got {list(layers)}.")
        self.layers = tuple(layers)
        self.taps = {positions[name] for name in layers}
        self.features = nn.Sequential(*modules[: max(self.taps) + 1])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Accept a whole torchvision VGG-19 state dict: keys this trunk does not hold (deeper layers, the
        classifier) are dropped; with ``strict`` every key it holds must be present."""
        own = self.state_dict().keys()
        return super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=strict, assign=assign)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"VGG19Features expects [B, 1 or 3, H, W] images in [0, 1], got {tuple(images.shape)}.")
        x = (images.expand(-1, 3, -1, -1) - self.mean) / self.std
        outputs = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.taps:
                outputs.append(x)
        return outputs


def load_style_network(
    path: str | os.PathLike | None,
    network_def: Callable[..., nn.Module] | None = VGG19Features,
    network_kwargs: Mapping[str, Any] | None = None,
    state_dict_key: str | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load the paper's ImageNet-pretrained style CNN from a local file (never downloads); wrap the result in
    :class:`GramDescriptor`.

    The file is either a state dict for ``network_def`` (default :class:`VGG19Features`, which takes torchvision's
    ``vgg19`` state dict as saved by ``torch.save(torchvision.models.vgg19(weights="IMAGENET1K_V1").state_dict(),
    path)`` on a connected machine), or, with ``network_def=None``, a TorchScript module returning a list of feature
    maps. Loading follows :func:`medgen_common.metrics.load_feature_extractor`.

    Args:
        path: the weights file.
        network_def, network_kwargs: constructor and arguments of the network (e.g. ``{"layers": [...]}``).
        state_dict_key: key of the state dict inside a checkpoint dictionary, or None.
        map_location: device the weights are loaded onto.

    Returns:
        The frozen network in eval mode.

    Raises:
        FileNotFoundError: ``path`` is None or not a file.
    """
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"style-network weights not found at {os.fspath(path) if path is not None else None!r}. Nothing is "
            "downloaded: save the pretrained VGG-19 state dict (torchvision layout) there on a connected machine, or "
            "use RandomFeatureGramDescriptor (the offline default) or the bundle's own encoder (BlockFeatures)."
        )
    return load_feature_extractor(path, network_def, network_kwargs, state_dict_key, map_location)


def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Yield ``[b, C, H, W]`` batches: slices of a tensor, or runs of equally shaped ``[C, H, W]`` items."""
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    run: list[torch.Tensor] = []
    for image in images:
        if run and (image.shape != run[0].shape or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(torch.as_tensor(image))
    if run:
        yield torch.stack(run)


def compute_style_descriptors(
    images: torch.Tensor | Iterable[torch.Tensor],
    descriptor: GramDescriptor,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    standardise_layers: bool = False,
) -> torch.Tensor:
    """Style descriptors of many images, in batches, without gradients.

    Args:
        images: ``[N, C, H, W]``, or an iterable of ``[C, H, W]`` tensors (consumed lazily, so images can be read
            from disk one by one; consecutive images of one shape are batched; Gram matrices do not depend on the
            image size, so sizes may differ).
        descriptor: the :class:`GramDescriptor`.
        batch_size: images per forward pass.
        device: device to run on (the descriptor is moved there); None keeps the descriptor's device.
        standardise_layers: divide each layer's block by its spread over this set of images (root mean over its
            entries of the variance across images), so every layer contributes equally to the distances whatever
            its activation scale. Descriptors standardised together are comparable only with each other.

    Returns:
        Descriptors ``[N, D]`` (float32, CPU).
    """
    if device is not None:
        descriptor.to(device)
    else:
        device = next(iter([*descriptor.parameters(), *descriptor.buffers()]), torch.empty(0)).device
    per_batch = [
        [block.cpu() for block in descriptor.layer_grams(batch.to(device).float())]
        for batch in _batches(images, batch_size)
    ]
    if not per_batch:
        raise ValueError("compute_style_descriptors got no images.")
    blocks = [torch.cat(layer) for layer in zip(*per_batch)]  # one [N, C_l^2] block per layer
    if standardise_layers:
        if blocks[0].shape[0] < 2:
            raise ValueError("standardise_layers needs at least two images.")
        blocks = [block / block.var(dim=0).mean().sqrt().clamp_min(1e-12) for block in blocks]
    return torch.cat(blocks, dim=1)


class ContextSelection(NamedTuple):
    """``index`` ``[N]`` (long): each item's context; ``mse`` ``[N]``: the descriptor MSE to it."""

    index: torch.Tensor
    mse: torch.Tensor


def select_context(
    descriptors: torch.Tensor,
    groups: Sequence[Hashable] | None = None,
    exclude_same_group: bool = False,
    chunk_size: int = 1024,
) -> ContextSelection:
    """For each item, the nearest *other* item by mean squared error between descriptors (paper §2.1.1).

    An item is never its own context, even when another item has an identical descriptor (a duplicated image is
    chosen instead). Ties go to the lowest index.

    Args:
        descriptors: ``[N, D]``, e.g. from :func:`compute_style_descriptors`.
        groups: a clip, patient or subject identifier per item (length ``N``).
        exclude_same_group: never choose an item of the same group (guards against contexts that share the
            query's geometry, csg spec §7).
        chunk_size: query rows per distance block (bounds memory to ``chunk_size x N``).

    Raises:
        ValueError: fewer than two items, ``groups`` of the wrong length or missing while excluding, or an item
            left with no candidate (every other item in its group).
    """
    if descriptors.ndim != 2 or descriptors.shape[0] < 2:
        raise ValueError(f"select_context needs descriptors [N, D] with N >= 2, got {tuple(descriptors.shape)}.")
    count = descriptors.shape[0]
    if exclude_same_group and groups is None:
        raise ValueError("exclude_same_group=True needs groups (one identifier per item).")
    if groups is not None and len(groups) != count:
        raise ValueError(f"groups must have one identifier per descriptor ({count}), got {len(groups)}.")
    group_ids = None
    if exclude_same_group:
        codes: dict[Hashable, int] = {}
        group_ids = torch.tensor([codes.setdefault(group, len(codes)) for group in groups])
    features = descriptors.double()
    squared_norms = features.pow(2).sum(dim=1)
    indices, errors = [], []
    for start in range(0, count, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, count))
        mse = (squared_norms[rows, None] + squared_norms[None] - 2 * features[rows] @ features.T).clamp_min(0)
        mse = mse / features.shape[1]
        excluded = rows[:, None] == torch.arange(count)[None]
        if group_ids is not None:
            excluded |= group_ids[rows, None] == group_ids[None]
        mse = mse.masked_fill(excluded, float("inf"))
        error, index = mse.min(dim=1)
        if torch.isinf(error).any():
            item = int(rows[torch.isinf(error)][0])
            raise ValueError(
                f"item {item} has no context candidate: every other item is in its group {groups[item]!r}. "
                "Give more groups, or set exclude_same_group=False."
            )
        indices.append(index)
        errors.append(error)
    return ContextSelection(torch.cat(indices), torch.cat(errors).float())


def load_grey_image(path: str | os.PathLike, intensity_range: Sequence[float] = (0.0, 1.0)) -> torch.Tensor:
    """Read a 2D image file with MONAI's ``LoadImage`` as ``[1, H, W]`` in [0, 1].

    Colour channels are averaged (ultrasound is often stored as RGB PNG); a trailing singleton axis (2D NIfTI) is
    dropped; intensities are mapped linearly from ``intensity_range`` (e.g. ``(0, 255)`` for 8-bit PNG) to [0, 1]
    and clipped. A fixed range, not each image's min-max, keeps gain differences, which are part of the style.
    """
    image = torch.as_tensor(LoadImage(image_only=True, ensure_channel_first=True)(os.fspath(path))).float()
    if image.ndim == 4 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 3:
        raise ValueError(f"'{os.fspath(path)}' is not a 2D image: loaded shape {tuple(image.shape)} (channel first).")
    low, high = float(intensity_range[0]), float(intensity_range[1])
    return ((image.mean(dim=0, keepdim=True) - low) / (high - low)).clamp(0.0, 1.0)


def _rebase(value: str | list, old_base: Path, new_base: Path) -> str | list:
    """A datalist path (or list of paths) relative to ``old_base``, rewritten relative to ``new_base``, or absolute
    where it lies outside ``new_base`` (datalists may not climb out of their root); absolute paths are unchanged."""
    if isinstance(value, list):
        return [_rebase(item, old_base, new_base) for item in value]
    if os.path.isabs(value) or old_base == new_base:
        return value
    relative = os.path.relpath(old_base / value, new_base)
    return os.path.abspath(old_base / value) if relative.split(os.sep)[0] == os.pardir else relative


def make_context_datalist(
    datalist_path: str | os.PathLike,
    output_path: str | os.PathLike,
    descriptor: GramDescriptor,
    splits: Sequence[str] | None = None,
    image_key: str = "image",
    path_keys: Sequence[str] = ("image", "label"),
    group_key: str = "subject",
    exclude_same_group: bool = False,
    intensity_range: Sequence[float] = (0.0, 1.0),
    batch_size: int = 16,
    device: str | torch.device | None = None,
    standardise_layers: bool = False,
) -> dict:
    """Pair every entry of a MONAI datalist with its context image and write the new datalist JSON (atomically).

    Each entry (``image``, ``label``, optionally ``subject``, ``device``) gets ``context``: the ``image`` path of
    the entry of the same split whose style descriptor is nearest (:func:`select_context`), and
    ``context_subject`` / ``context_device`` when that entry has ``subject`` / ``device``. Splits are paired within
    themselves, so no test image becomes a training context. Other top-level keys are copied.

    Args:
        datalist_path: the input datalist ``{"training": [...], ...}``; relative paths are relative to its folder.
        output_path: the datalist to write; relative paths under ``path_keys`` and ``context`` are rewritten
            relative to its folder, or made absolute when outside it (other keys are copied verbatim).
        descriptor: e.g. :class:`RandomFeatureGramDescriptor` or a :class:`GramDescriptor` of the trained encoder.
        splits: the lists to pair; None pairs every top-level list of entries (objects).
        image_key: key of the image path in an entry.
        group_key: key of the clip / patient identifier; used when ``exclude_same_group``.
        exclude_same_group: never take the context from the same ``group_key`` value.
        intensity_range: stored intensity range mapped to [0, 1] (:func:`load_grey_image`).
        batch_size, device, standardise_layers: see :func:`compute_style_descriptors` (standardised per split).

    Returns:
        The written datalist.

    Raises:
        ValueError: a split is missing or has fewer than two entries, an entry misses ``image_key`` (or
            ``group_key`` when excluding), or an entry has no candidate left.
    """
    datalist_path, output_path = Path(datalist_path), Path(output_path)
    content = read_json(datalist_path, what="datalist")
    old_base, new_base = datalist_path.parent.resolve(), output_path.parent.resolve()
    if splits is None:
        splits = [
            key for key, value in content.items()
            if isinstance(value, list) and value and all(isinstance(entry, dict) for entry in value)
        ]  # fmt: skip
    output = dict(content)
    for split in splits:
        entries = content.get(split)
        if not isinstance(entries, list) or len(entries) < 2:
            raise ValueError(f"datalist '{datalist_path}': split '{split}' must list at least two entries to pair.")
        needed = (image_key, group_key) if exclude_same_group else (image_key,)
        for index, entry in enumerate(entries):
            missing = [key for key in needed if key not in entry]
            if missing:
                raise ValueError(f"datalist '{datalist_path}', {split}[{index}] misses key(s) {missing}.")
        paths = [old_base / entry[image_key] for entry in entries]
        descriptors = compute_style_descriptors(
            (load_grey_image(path, intensity_range) for path in paths), descriptor, batch_size=batch_size,
            device=device, standardise_layers=standardise_layers,
        )  # fmt: skip
        groups = [entry.get(group_key) for entry in entries]
        selection = select_context(descriptors, groups if exclude_same_group else None, exclude_same_group)
        paired = []
        for entry, context_index in zip(entries, selection.index.tolist()):
            context_entry = entries[context_index]
            item = {
                key: _rebase(value, old_base, new_base) if key in path_keys else value
                for key, value in entry.items()
            }
            item["context"] = _rebase(context_entry[image_key], old_base, new_base)
            for key in ("subject", "device"):
                if key in context_entry:
                    item[f"context_{key}"] = context_entry[key]
            paired.append(item)
        output[split] = paired
    write_json(output, output_path)
    return output
