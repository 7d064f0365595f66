"""Metrics for generated medical images: fidelity, segmentation overlap, distribution distances, diversity, copying.

Images are batch-first, channel-first tensors ``[B, C, H, W]`` (2D) or ``[B, C, H, W, D]`` (3D); every function
accepts both. MONAI's metrics are used where they exist (PSNR, SSIM, MS-SSIM, Dice, FID); this module adds the
shape checks, the per-image outputs and what MONAI lacks (KID, feature extraction, MS-SSIM diversity and
nearest-neighbour memorisation checks).

FID and KID compare feature vectors ``[N, F]`` produced by a feature extractor. Nothing is downloaded: the usual
Inception-v3 (2D) or a RadImageNet / MedicalNet ResNet (2D / 3D) is exported once, elsewhere, to a TorchScript file
(``torch.jit.trace(model.eval(), example).save("extractor.ts")``) and loaded with :func:`load_feature_extractor`.
Without such a file, :class:`RandomFeatureExtractor` gives an offline random-feature proxy whose numbers are only
comparable with each other, never with published FID/KID values.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from monai.metrics import (
    DiceMetric,
    MultiScaleSSIMMetric,
    PSNRMetric,
    SSIMMetric,
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_hausdorff_distance,
    get_confusion_matrix,
)
from monai.metrics.fid import get_fid_score
from monai.networks.layers.factories import Conv, Pool
from monai.networks.utils import one_hot

__all__ = [
    "paired_fidelity",
    "psnr",
    "ssim",
    "dice_per_class",
    "mean_dice_by_class",
    "surface_distances_per_class",
    "precision_recall_per_class",
    "FeatureExtractor",
    "load_feature_extractor",
    "RandomFeatureExtractor",
    "extract_features",
    "frechet_distance",
    "kernel_inception_distance",
    "MSSSIMDiversity",
    "ms_ssim_scales",
    "ms_ssim_diversity",
    "nearest_neighbour_distances",
    "memorisation_ratio",
    "memorisation_check",
]

#: Any module mapping images ``[B, C, *spatial]`` to feature vectors ``[B, F]`` (a trailing ``1 x ... x 1``
#: spatial tail, as left by a global pooling layer, is also accepted by :func:`extract_features`).
FeatureExtractor = torch.nn.Module

#: Scale weights of Wang et al. (2003), finest scale first; :func:`ms_ssim_diversity` uses the first ``n``.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_images(name: str, images: torch.Tensor, spatial_dims: int | None = None) -> None:
    """Raise ValueError unless ``images`` is ``[B, C, H, W]`` or ``[B, C, H, W, D]`` (as ``spatial_dims`` says)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}.")
    if spatial_dims is not None and spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    expected_ndims = (4, 5) if spatial_dims is None else (spatial_dims + 2,)
    if images.ndim not in expected_ndims:
        expected = " or ".join(f"{n - 2}D [B, C, *spatial] with {n} dimensions" for n in expected_ndims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(images.shape)}.")


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, from_dim: int = 0) -> None:
    """Raise ValueError unless ``a.shape[from_dim:] == b.shape[from_dim:]``."""
    if a.shape[from_dim:] != b.shape[from_dim:]:
        part = "shapes" if from_dim == 0 else f"shapes from dimension {from_dim} on"
        raise ValueError(f"{name_a} and {name_b} {part} must match, got {tuple(a.shape)} and {tuple(b.shape)}.")


def _check_features(name: str, features: torch.Tensor, min_rows: int = 2) -> None:
    """Raise ValueError unless ``features`` is ``[N, F]`` with ``N >= min_rows``."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name} must be feature vectors [N, F], got {shape}.")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} feature vectors, got shape {tuple(features.shape)}.")


# ---------------------------------------------------------------------------------------------------------------------
# Image fidelity


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image, with MONAI's ``PSNRMetric``.

    Args:
        pred: images ``[B, C, H, W[, D]]``.
        target: reference images, same shape as ``pred``.
        data_range: intensity range of the images (max - min possible value, e.g. 1.0 for images in [0, 1]).

    Returns:
        PSNR in dB per image, ``[B]``; ``inf`` where ``pred`` equals ``target``.
    """
    _check_images("pred", pred)
    _check_same_shape("pred", pred, "target", target)
    return PSNRMetric(max_val=data_range, reduction="none")(pred, target).reshape(-1)


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float, spatial_dims: int, win_size: int = 11
) -> torch.Tensor:
    """Structural similarity of each image (Gaussian window), with MONAI's ``SSIMMetric``.

    Args:
        pred: images ``[B, C, H, W]`` (``spatial_dims=2``) or ``[B, C, H, W, D]`` (``spatial_dims=3``).
        target: reference images, same shape as ``pred``.
        data_range: intensity range of the images (max - min possible value).
        spatial_dims: 2 or 3.
        win_size: side of the Gaussian window; every spatial size must be at least this.

    Returns:
        SSIM per image, ``[B]``, in [-1, 1]; 1 where ``pred`` equals ``target``.
    """
    _check_images("pred", pred, spatial_dims)
    _check_same_shape("pred", pred, "target", target)
    if min(pred.shape[2:]) < win_size:
        raise ValueError(f"SSIM with win_size={win_size} needs spatial sizes >= {win_size}, got {tuple(pred.shape)}.")
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=win_size, reduction="none")
    return metric(pred, target).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation overlap


def dice_per_class(
    pred_probs: torch.Tensor, target_probs: torch.Tensor, include_background: bool = False
) -> torch.Tensor:
    """Dice of each class in each image, after hardening probabilistic label maps, with MONAI's ``DiceMetric``.

    Both maps are argmaxed over channels and one-hot encoded, so partial-volume maps are scored by their most
    probable label per voxel.

    Args:
        pred_probs: predicted label probabilities ``[B, C, H, W[, D]]``, channel 0 the background, channels
            summing to 1 per voxel.
        target_probs: reference label probabilities, same shape.
        include_background: whether to score channel 0 as well.

    Returns:
        Dice in [0, 1], ``[B, C]`` or ``[B, C - 1]`` without the background. A class absent from both the
        prediction and the target of an image is NaN for that image (nothing to score); a class absent from the
        target but predicted scores 0.
    """
    _check_images("pred_probs", pred_probs)
    _check_same_shape("pred_probs", pred_probs, "target_probs", target_probs)
    num_classes = pred_probs.shape[1]
    if num_classes < 2:
        raise ValueError(
            f"dice_per_class needs at least 2 channels (background + a class), got shape {tuple(pred_probs.shape)}."
        )
    pred_one_hot = one_hot(pred_probs.argmax(dim=1, keepdim=True), num_classes=num_classes)
    target_one_hot = one_hot(target_probs.argmax(dim=1, keepdim=True), num_classes=num_classes)
    metric = DiceMetric(include_background=include_background, reduction="none", ignore_empty=False)
    dice = metric(pred_one_hot, target_one_hot)
    first_class = 0 if include_background else 1
    absent_in_both = (pred_one_hot + target_one_hot)[:, first_class:].flatten(start_dim=2).sum(dim=2) == 0
    return dice.masked_fill(absent_in_both, float("nan"))


def mean_dice_by_class(
    pred_probs: torch.Tensor, target_probs: torch.Tensor, include_background: bool = False
) -> dict[int, float]:
    """Mean Dice of each class over the batch, ignoring images where the class is absent from both maps.

    Args:
        pred_probs: predicted label probabilities ``[B, C, H, W[, D]]``, see :func:`dice_per_class`.
        target_probs: reference label probabilities, same shape.
        include_background: whether to score channel 0 as well.

    Returns:
        ``{class index: mean Dice}``, class indices as in the channel dimension (starting at 1 without the
        background); NaN for a class absent from every image of both maps.
    """
    dice = dice_per_class(pred_probs, target_probs, include_background=include_background)
    first_class = 0 if include_background else 1
    return {first_class + i: float(v) for i, v in enumerate(torch.nanmean(dice, dim=0))}


def surface_distances_per_class(
    pred_one_hot: torch.Tensor,
    target_one_hot: torch.Tensor,
    include_background: bool = False,
    spacing: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """95th-percentile Hausdorff distance and symmetric average surface distance of each class, with MONAI's.

    Args:
        pred_one_hot, target_one_hot: one-hot maps ``[B, C, H, W[, D]]``.
        include_background: whether to score channel 0 as well.
        spacing: voxel size (mm) per spatial axis; default 1, i.e. distances in voxels.

    Returns:
        ``(hd95, assd)``, each ``[B, C]`` or ``[B, C - 1]``. A class absent from both maps is NaN (nothing to score);
        present in only one of them it gets the image diagonal, the largest distance there is, so a missed or
        hallucinated structure is penalised rather than dropped from the mean.
    """
    _check_images("pred_one_hot", pred_one_hot)
    _check_same_shape("pred_one_hot", pred_one_hot, "target_one_hot", target_one_hot)
    spatial = pred_one_hot.shape[2:]
    spacing = [1.0] * len(spatial) if spacing is None else [float(v) for v in spacing]
    if len(spacing) != len(spatial):
        raise ValueError(f"spacing needs {len(spatial)} values for spatial shape {tuple(spatial)}, got {spacing}.")
    with warnings.catch_warnings():  # MONAI warns about empty classes, which are handled below
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(
            pred_one_hot, target_one_hot, include_background, percentile=95, spacing=spacing
        )
        assd = compute_average_surface_distance(
            pred_one_hot, target_one_hot, include_background, symmetric=True, spacing=spacing
        )
    first_class = 0 if include_background else 1
    present_pred = pred_one_hot[:, first_class:].flatten(2).sum(2) > 0
    present_target = target_one_hot[:, first_class:].flatten(2).sum(2) > 0
    diagonal = math.sqrt(sum((n * d) ** 2 for n, d in zip(spatial, spacing)))
    one_sided = present_pred ^ present_target
    hd95, assd = (m.float().cpu().masked_fill(one_sided.cpu(), diagonal) for m in (hd95, assd))
    absent = ~(present_pred | present_target).cpu()
    return hd95.masked_fill(absent, math.nan), assd.masked_fill(absent, math.nan)


def precision_recall_per_class(
    pred_one_hot: torch.Tensor, target_one_hot: torch.Tensor, include_background: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision TP / (TP + FP) and recall TP / (TP + FN) of each class, from MONAI's confusion matrix.

    Args:
        pred_one_hot, target_one_hot: one-hot maps ``[B, C, H, W[, D]]``.
        include_background: whether to score channel 0 as well.

    Returns:
        ``(precision, recall)``, each ``[B, C]`` or ``[B, C - 1]`` in [0, 1]. A class absent from both maps is NaN
        (nothing to score), as for :func:`dice_per_class`; a class missed entirely has precision 0 and a class
        predicted where the target has none has recall 0, so neither failure drops out of a mean.
    """
    _check_images("pred_one_hot", pred_one_hot)
    _check_same_shape("pred_one_hot", pred_one_hot, "target_one_hot", target_one_hot)
    confusion = get_confusion_matrix(pred_one_hot.float(), target_one_hot.float(), include_background)
    with warnings.catch_warnings():  # MONAI warns when a denominator is 0; those entries are set below
        warnings.simplefilter("ignore")
        precision = compute_confusion_matrix_metric("precision", confusion).nan_to_num(0.0)
        recall = compute_confusion_matrix_metric("recall", confusion).nan_to_num(0.0)
    first_class = 0 if include_background else 1
    present = (pred_one_hot + target_one_hot)[:, first_class:].flatten(start_dim=2).sum(dim=2) > 0
    return precision.masked_fill(~present, math.nan), recall.masked_fill(~present, math.nan)


# ---------------------------------------------------------------------------------------------------------------------
# Feature extractors


def load_feature_extractor(
    path: str | os.PathLike | None,
    network_def: Callable[..., torch.nn.Module] | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
    state_dict_key: str | None = None,
    map_location: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Load a frozen feature extractor from a local file; never downloads.

    Two kinds of file are read:

    - a TorchScript archive (when ``network_def`` is None), e.g. an Inception-v3 up to its pool3 layer or a
      RadImageNet / MedicalNet ResNet without its classifier, exported once with
      ``torch.jit.trace(model.eval(), example_images).save(path)``. Any preprocessing the network expects
      (resizing, intensity normalisation, channel repeat) can be baked into the exported module.
    - a state dict (when ``network_def`` is given), loaded with ``torch.load(..., weights_only=True)`` into
      ``network_def(**network_kwargs)``, e.g. ``monai.networks.nets.resnet18`` with ``spatial_dims``,
      ``n_input_channels`` and ``feed_forward=False`` so that it returns pooled features ``[B, F]``.

    Args:
        path: the file to load.
        network_def: constructor of the network that the state dict belongs to; None for a TorchScript file.
        network_kwargs: keyword arguments for ``network_def``.
        state_dict_key: key of the state dict inside a checkpoint dictionary (e.g. ``"state_dict"``); None when
            the file is the state dict itself.
        map_location: device the weights are loaded onto.

    Returns:
        The extractor, in eval mode with gradients disabled.

    Raises:
        FileNotFoundError: when ``path`` is None or does not exist.
        ValueError: when a file loaded without ``network_def`` is not a TorchScript archive.
    """
    how_to = (
        "Provide local weights: export the network to TorchScript once (torch.jit.trace(model.eval(), example)"
        ".save(path)) and pass that path, or pass a state-dict file together with `network_def`. "
        "For an offline proxy without weights use RandomFeatureExtractor (not comparable with published FID)."
    )
    if path is None:
        raise FileNotFoundError(f"No feature-extractor weights given (path=None). {how_to}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Feature-extractor weights not found at '{os.fspath(path)}'. {how_to}")
    if network_def is None:
        try:
            extractor = torch.jit.load(os.fspath(path), map_location=map_location)
        except RuntimeError as error:
            raise ValueError(
                f"'{os.fspath(path)}' is not a TorchScript archive ({error.__class__.__name__}: "
                f"{str(error).splitlines()[0]}). For a state-dict file pass `network_def`."
            ) from error
    else:
        state_dict = torch.load(path, map_location=map_location, weights_only=True)
        if state_dict_key is not None:
            state_dict = state_dict[state_dict_key]
        extractor = network_def(**(network_kwargs or {}))
        extractor.load_state_dict(state_dict)
        extractor.to(map_location)
    for parameter in extractor.parameters():  # ScriptModules do not support requires_grad_()
        parameter.requires_grad_(False)
    return extractor.eval()


class RandomFeatureExtractor(torch.nn.Module):
    """Random-feature proxy, not Inception; numbers are not comparable with published FID.

    A frozen, randomly initialised convolutional network (three stride-2 3x3[x3] convolutions with LeakyReLU,
    then global average pooling) mapping ``[B, in_channels, *spatial]`` to ``[B, feature_dim]``. Its weights
    depend only on ``seed`` (the global random state is untouched), so FID/KID computed with it are repeatable
    and comparable between runs that use the same ``spatial_dims``, ``in_channels``, ``feature_dim`` and ``seed``.
    Use it for offline smoke tests and relative comparisons; use :func:`load_feature_extractor` with real
    pretrained weights for reportable numbers.

    Args:
        spatial_dims: 2 or 3.
        in_channels: number of image channels.
        feature_dim: length of the output feature vector.
        seed: seed of the weight initialisation.
    """

    def __init__(self, spatial_dims: int, in_channels: int, feature_dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.feature_dim = feature_dim
        self.seed = seed
        conv_type = Conv[Conv.CONV, spatial_dims]
        channels = (in_channels, 16, 32, feature_dim)
        layers: list[torch.nn.Module] = []
        with torch.random.fork_rng(devices=[]):  # the default initialisation below would draw from the global RNG
            for c_in, c_out in zip(channels[:-1], channels[1:]):
                layers += [conv_type(c_in, c_out, kernel_size=3, stride=2, padding=1), torch.nn.LeakyReLU(0.2)]
        self.features = torch.nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        generator = torch.Generator().manual_seed(seed)
        for layer in self.features:
            if isinstance(layer, conv_type):
                torch.nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu", generator=generator)
                torch.nn.init.normal_(layer.bias, std=0.1, generator=generator)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[B, in_channels, *spatial]`` images to features ``[B, feature_dim]``."""
        if images.ndim != self.spatial_dims + 2 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"RandomFeatureExtractor expects [B, {self.in_channels}, *spatial] with {self.spatial_dims} spatial "
                f"dimensions, got {tuple(images.shape)}."
            )
        return self.pool(self.features(images)).flatten(start_dim=1)


def extract_features(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    repeat_channels_to: int | None = None,
) -> torch.Tensor:
    """Run a feature extractor over images in batches, without gradients and in eval mode.

    Args:
        extractor: module mapping ``[B, C, *spatial]`` to ``[B, F]`` (or ``[B, F, 1, ..., 1]``).
        images: images ``[N, C, H, W[, D]]``, already preprocessed as the extractor expects.
        batch_size: images per forward pass.
        device: device to run on; the extractor is moved there. None uses the extractor's current device.
        repeat_channels_to: number of input channels the extractor wants (e.g. 3 for ImageNet networks);
            single-channel images are repeated to it. None passes images unchanged.

    Returns:
        Features ``[N, F]`` on the CPU.
    """
    _check_images("images", images)
    if repeat_channels_to is not None and images.shape[1] not in (1, repeat_channels_to):
        raise ValueError(
            f"repeat_channels_to={repeat_channels_to} needs images with 1 or {repeat_channels_to} channels, "
            f"got {tuple(images.shape)}."
        )
    if device is None:
        first_tensor = next(iter([*extractor.parameters(), *extractor.buffers()]), None)
        device = first_tensor.device if first_tensor is not None else torch.device("cpu")
    else:
        extractor.to(device)
    was_training = extractor.training
    extractor.eval()
    features = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            if repeat_channels_to is not None and batch.shape[1] == 1:
                batch = batch.expand(-1, repeat_channels_to, *batch.shape[2:])
            output = extractor(batch)
            if output.ndim > 2 and all(size == 1 for size in output.shape[2:]):
                output = output.flatten(start_dim=1)
            if output.ndim != 2 or output.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"the feature extractor must return [B, F] features, got {tuple(output.shape)} "
                    f"for an input batch of shape {tuple(batch.shape)}."
                )
            features.append(output.cpu())
    extractor.train(was_training)
    return torch.cat(features)


# ---------------------------------------------------------------------------------------------------------------------
# Distribution distances between feature sets


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID with an Inception extractor).

    Computed with MONAI's ``get_fid_score`` in float64. Use many more vectors than features (``N >> F``) for a
    stable estimate; the estimate is biased upwards for small ``N``.

    Args:
        feat_a: features ``[N_a, F]``, e.g. of generated images.
        feat_b: features ``[N_b, F]``, e.g. of real images.

    Returns:
        The distance, >= 0 up to rounding; 0 for identical feature sets.
    """
    _check_features("feat_a", feat_a)
    _check_features("feat_b", feat_b)
    _check_same_shape("feat_a", feat_a, "feat_b", feat_b, from_dim=1)
    return float(get_fid_score(feat_a, feat_b))


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cubic polynomial kernel ``k(x, y) = (x.y / d + 1) ** 3`` between the rows of ``[n, d]`` and ``[m, d]``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(
    feat_a: torch.Tensor, feat_b: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (KID): unbiased squared MMD with a cubic polynomial kernel, over random subsets.

    Bińkowski et al., "Demystifying MMD GANs", ICLR 2018: ``k(x, y) = (x.y / F + 1) ** 3``, and for each of
    ``subsets`` random subsets of ``subset_size`` vectors drawn without replacement from each set, the unbiased
    estimator ``MMD² = mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)``. Being
    unbiased, it averages to 0 for two samples of one distribution (single subsets may be slightly negative).

    Args:
        feat_a: features ``[N_a, F]``, e.g. of generated images.
        feat_b: features ``[N_b, F]``, e.g. of real images.
        subsets: number of random subsets.
        subset_size: vectors per subset, capped at ``min(N_a, N_b)`` (as clean-fid does).
        seed: seed of the subset sampling.

    Returns:
        ``(mean, std)`` of the MMD² estimates over the subsets (std with ``ddof=0``).
    """
    _check_features("feat_a", feat_a)
    _check_features("feat_b", feat_b)
    _check_same_shape("feat_a", feat_a, "feat_b", feat_b, from_dim=1)
    if subsets < 1 or subset_size < 2:
        raise ValueError(
            f"KID needs subsets >= 1 and subset_size >= 2, got subsets={subsets} and subset_size={subset_size}."
        )
    feat_a, feat_b = feat_a.double(), feat_b.double()
    m = min(subset_size, feat_a.shape[0], feat_b.shape[0])
    generator = torch.Generator().manual_seed(seed)
    estimates = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        a = feat_a[torch.randperm(feat_a.shape[0], generator=generator)[:m].to(feat_a.device)]
        b = feat_b[torch.randperm(feat_b.shape[0], generator=generator)[:m].to(feat_b.device)]
        k_aa, k_bb, k_ab = _polynomial_kernel(a, a), _polynomial_kernel(b, b), _polynomial_kernel(a, b)
        within = (k_aa.sum() - k_aa.trace() + k_bb.sum() - k_bb.trace()) / (m * (m - 1))
        estimates[s] = within - 2 * k_ab.sum() / (m * m)
    return float(estimates.mean()), float(estimates.std(correction=0))


# ---------------------------------------------------------------------------------------------------------------------
# Diversity


class MSSSIMDiversity(NamedTuple):
    """Result of :func:`ms_ssim_diversity`; ``._asdict()`` gives a loggable dict."""

    samples: float
    """Mean pairwise MS-SSIM among the generated samples (lower = more diverse)."""
    reference: float | None
    """The same among the reference images, None when no reference set was given."""
    num_scales: int
    """Number of MS-SSIM scales used for both."""


def ms_ssim_scales(spatial_shape: Sequence[int], kernel_size: int = 11) -> int:
    """Largest number of MS-SSIM scales (1 to 5) that images of ``spatial_shape`` support.

    Scale ``s`` (0-based) sees the image downsampled ``2**s`` times, and the Gaussian window must fit at the
    coarsest scale: ``size // 2**(n - 1) >= kernel_size`` for every spatial size. MONAI's
    ``MultiScaleSSIMMetric`` also requires ``size // max(1, n - 1)**2 >= kernel_size``; both are enforced. For
    ``kernel_size=11`` this gives 5 scales from 176 voxels, 4 from 99, 3 from 44, 2 from 22 and 1 (plain SSIM)
    from 11.

    Raises:
        ValueError: when the smallest spatial size is below ``kernel_size``.
    """
    smallest = min(spatial_shape)
    for n in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if smallest // 2 ** (n - 1) >= kernel_size and smallest // max(1, n - 1) ** 2 >= kernel_size:
            return n
    raise ValueError(
        f"MS-SSIM with kernel_size={kernel_size} needs spatial sizes >= {kernel_size}, got {tuple(spatial_shape)}."
    )


def _mean_pairwise_ms_ssim(
    images: torch.Tensor, metric: MultiScaleSSIMMetric, n_pairs: int | None, seed: int, pair_batch_size: int
) -> float:
    """Mean MS-SSIM over all pairs ``i < j`` of ``images``, or over ``n_pairs`` random pairs ``i != j``."""
    n = images.shape[0]
    if n_pairs is None:
        first, second = torch.triu_indices(n, n, offset=1)
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(n, (n_pairs,), generator=generator)
        second = (first + torch.randint(1, n, (n_pairs,), generator=generator)) % n
    values = [
        metric(images[first[start : start + pair_batch_size]], images[second[start : start + pair_batch_size]])
        for start in range(0, first.numel(), pair_batch_size)
    ]
    return float(torch.cat(values).mean())


def ms_ssim_diversity(
    samples: torch.Tensor,
    data_range: float,
    spatial_dims: int,
    n_pairs: int | None = None,
    seed: int = 0,
    reference: torch.Tensor | None = None,
    kernel_size: int = 11,
    pair_batch_size: int = 32,
) -> MSSSIMDiversity:
    """Mean pairwise MS-SSIM among generated samples, a diversity measure: lower means more diverse.

    Mode collapse shows as a value well above that of real images, so pass ``reference`` (real images of the same
    shape) to get the same measure, with the same scales and pairs sampling, for comparison. The number of scales
    is chosen automatically from the smallest spatial size and ``kernel_size`` (:func:`ms_ssim_scales`); the
    weights are the first ``n`` of Wang et al.'s ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)``, renormalised to
    sum to 1 (a single scale is plain SSIM). Values are comparable only between runs with the same scales.

    Args:
        samples: generated images ``[N, C, H, W]`` (``spatial_dims=2``) or ``[N, C, H, W, D]`` (3), ``N >= 2``.
        data_range: intensity range of the images (max - min possible value).
        spatial_dims: 2 or 3.
        n_pairs: number of random pairs (drawn with replacement, never an image with itself); None uses all
            ``N * (N - 1) / 2`` pairs.
        seed: seed of the pair sampling.
        reference: optional real images ``[M, C, *spatial]`` with the samples' channel and spatial shape.
        kernel_size: side of the Gaussian window.
        pair_batch_size: pairs per MS-SSIM call, to bound memory.

    Returns:
        :class:`MSSSIMDiversity` with the samples' value, the reference's value (or None) and the number of scales.
    """
    _check_images("samples", samples, spatial_dims)
    if samples.shape[0] < 2:
        raise ValueError(f"ms_ssim_diversity needs at least 2 samples, got shape {tuple(samples.shape)}.")
    if reference is not None:
        _check_images("reference", reference, spatial_dims)
        _check_same_shape("samples", samples, "reference", reference, from_dim=1)
        if reference.shape[0] < 2:
            raise ValueError(f"ms_ssim_diversity needs at least 2 reference images, got {tuple(reference.shape)}.")
    metric, num_scales = _ms_ssim_metric(samples.shape[2:], spatial_dims, data_range, kernel_size)
    sample_value = _mean_pairwise_ms_ssim(samples, metric, n_pairs, seed, pair_batch_size)
    reference_value = (
        None if reference is None else _mean_pairwise_ms_ssim(reference, metric, n_pairs, seed, pair_batch_size)
    )
    return MSSSIMDiversity(samples=sample_value, reference=reference_value, num_scales=num_scales)


def _ms_ssim_metric(spatial_shape: Sequence[int], spatial_dims: int, data_range: float, kernel_size: int):
    num_scales = ms_ssim_scales(spatial_shape, kernel_size)
    weights = MS_SSIM_WEIGHTS[:num_scales]
    metric = MultiScaleSSIMMetric(
        spatial_dims=spatial_dims, data_range=data_range, kernel_size=kernel_size,
        weights=tuple(w / sum(weights) for w in weights), reduction="none",
    )  # fmt: skip
    return metric, num_scales


def paired_fidelity(
    generated: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, kernel_size: int = 11
) -> dict[str, Any]:
    """Fidelity of conditional outputs to the images they should reproduce (EMIT-Diff's Table 1: MAE, MSE, RMSE and
    MS-SSIM), per pair and as mean ± SD over pairs.

    Args:
        generated, reference: ``[N, C, *spatial]`` (2D or 3D), the same shape; intensities in a range of
            ``data_range``.
        kernel_size: MS-SSIM's Gaussian window; the number of scales follows from the image size
            (:func:`ms_ssim_scales`).

    Returns:
        ``{"mae", "mse", "rmse", "ms_ssim"}``, each ``{"per_pair": [N floats], "mean", "sd"}``, and ``"ms_ssim_scales"``.
    """
    _check_images("generated", generated)
    _check_same_shape("generated", generated, "reference", reference)
    generated, reference = generated.float(), reference.float()
    error = (generated - reference).flatten(1)
    metric, num_scales = _ms_ssim_metric(generated.shape[2:], generated.ndim - 2, data_range, kernel_size)
    values = {
        "mae": error.abs().mean(1),
        "mse": error.pow(2).mean(1),
        "rmse": error.pow(2).mean(1).sqrt(),
        "ms_ssim": metric(generated, reference).flatten(),
    }
    summary = {
        name: {"per_pair": v.tolist(), "mean": float(v.mean()), "sd": float(v.std()) if len(v) > 1 else 0.0}
        for name, v in values.items()
    }
    return {**summary, "ms_ssim_scales": num_scales}


# ---------------------------------------------------------------------------------------------------------------------
# Memorisation


NEAREST_NEIGHBOUR_METRICS = ("mse", "correlation", "patch_max")


def _squared_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return (queries.square().sum(1, keepdim=True) + keys.square().sum(1) - 2 * queries @ keys.T).clamp_min(0)


def _image_patches(images: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """The ``grid`` per spatial axis tiles of images ``[B, C, *spatial]``, each flattened to ``[B, V_p]``."""
    patches = [images]
    for axis in range(2, images.ndim):
        patches = [part for patch in patches for part in torch.tensor_split(patch, grid, dim=axis)]
    return [patch.flatten(start_dim=1) for patch in patches]


def _pairwise_distances(
    queries: torch.Tensor, keys: torch.Tensor, metric: str, data_range: float = 1.0, grid: int = 4
) -> torch.Tensor:
    """Distances ``[n, m]`` between images ``[n, C, *spatial]`` and ``[m, C, *spatial]`` (float64)."""
    if metric == "patch_max":  # Carlini et al. 2023 / MediSyn: the worst-matching tile decides
        per_patch = [
            _squared_distances(q, k) / (data_range**2 * q.shape[1])
            for q, k in zip(_image_patches(queries, grid), _image_patches(keys, grid))
            if q.shape[1] > 0
        ]
        return torch.stack(per_patch).amax(0).sqrt()
    queries, keys = queries.flatten(start_dim=1), keys.flatten(start_dim=1)
    if metric == "mse":
        return _squared_distances(queries, keys) / queries.shape[1]
    # correlation: rows were centred and scaled to unit norm, so the dot product is Pearson's r
    return 1 - queries @ keys.T


def _standardise_rows(flat: torch.Tensor) -> torch.Tensor:
    """Centre each row and scale it to unit norm; constant rows stay zero (correlation 0 with everything)."""
    centred = flat - flat.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)


def nearest_neighbour_distances(
    samples: torch.Tensor,
    train: torch.Tensor,
    metric: str = "mse",
    chunk_size: int = 1024,
    data_range: float = 1.0,
    grid: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from each sample to its nearest training image, and that image's index.

    Distances are computed voxel-wise on the flattened images in float64, ``chunk_size x chunk_size`` at a time,
    so thousands of small images fit in memory.

    Args:
        samples: images ``[N, C, H, W[, D]]`` (generated, or held-out real images).
        train: training images ``[M, C, *spatial]``, same channel and spatial shape.
        metric: ``"mse"``, the mean squared voxel difference (0 for an exact copy), or ``"correlation"``,
            ``1 - Pearson correlation`` in [0, 2] (0 for a copy up to a positive linear intensity change; a
            constant image has correlation 0, i.e. distance 1, with everything), or ``"patch_max"``, the
            patch-max normalised L2 of Carlini et al. (2023) used by MediSyn: the images are cut into ``grid`` tiles
            per spatial axis and ``d = max_p ||x_p - y_p||_2 / sqrt(data_range^2 * V_p)`` in [0, 1] for intensities
            within ``data_range``; MediSyn flags d <= 0.15 as a copy.
        chunk_size: samples and training images per block of the distance matrix.
        data_range, grid: of ``"patch_max"``.

    Returns:
        ``(distances [N], indices [N])``: the nearest-neighbour distance (float64) and the index into ``train``.
    """
    if metric not in NEAREST_NEIGHBOUR_METRICS:
        raise ValueError(f"metric must be one of {list(NEAREST_NEIGHBOUR_METRICS)}, got {metric!r}.")
    _check_images("samples", samples)
    _check_images("train", train)
    _check_same_shape("samples", samples, "train", train, from_dim=1)
    if train.shape[0] == 0:
        raise ValueError(f"train must hold at least one image, got shape {tuple(train.shape)}.")

    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = images.double().to(samples.device)
        return _standardise_rows(images.flatten(start_dim=1)) if metric == "correlation" else images

    best_distances = torch.full((samples.shape[0],), math.inf, dtype=torch.float64, device=samples.device)
    best_indices = torch.zeros(samples.shape[0], dtype=torch.long, device=samples.device)
    for q_start in range(0, samples.shape[0], chunk_size):
        queries = prepare(samples[q_start : q_start + chunk_size])
        q_slice = slice(q_start, q_start + queries.shape[0])
        for k_start in range(0, train.shape[0], chunk_size):
            keys = prepare(train[k_start : k_start + chunk_size])
            distances, indices = _pairwise_distances(queries, keys, metric, data_range, grid).min(dim=1)
            closer = distances < best_distances[q_slice]
            best_distances[q_slice] = torch.where(closer, distances, best_distances[q_slice])
            best_indices[q_slice] = torch.where(closer, indices + k_start, best_indices[q_slice])
    return best_distances, best_indices


def memorisation_ratio(
    samples: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor, metric: str = "mse", chunk_size: int = 1024
) -> float:
    """Median nearest-training-image distance of generated samples over that of held-out real images.

    ``holdout`` are real images from the training distribution that were not used for training, so their
    distance to the nearest training image is what a model that generalises (draws new images from the same
    distribution) should reach. Interpretation:

    - about 1: samples are as far from the training set as unseen real images are (healthy);
    - well below 1 (e.g. < 0.5): samples sit much closer to training images than real data do, which suggests
      copying; inspect the pairs given by :func:`nearest_neighbour_distances`, since a ratio can also drop when
      a model collapses onto a few common training-like images;
    - above 1: samples are farther from the training set than real images (poor fidelity or a distribution
      shift), not memorisation.

    The ratio depends on the training set size (more training images, smaller distances), so compare runs with
    the same ``train`` and ``holdout``.

    Args:
        samples: generated images ``[N, C, H, W[, D]]``.
        train: training images ``[M, C, *spatial]``.
        holdout: held-out real images ``[K, C, *spatial]``, disjoint from ``train``.
        metric: ``"mse"`` or ``"correlation"``, see :func:`nearest_neighbour_distances`.
        chunk_size: see :func:`nearest_neighbour_distances`.

    Returns:
        The ratio, >= 0.

    Raises:
        ValueError: when most held-out images have a training copy (median distance numerically 0, < 1e-12), so
            the ratio is undefined.
    """
    _check_images("holdout", holdout)
    _check_same_shape("holdout", holdout, "train", train, from_dim=1)
    sample_distances, _ = nearest_neighbour_distances(samples, train, metric, chunk_size)
    holdout_distances, _ = nearest_neighbour_distances(holdout, train, metric, chunk_size)
    holdout_median = float(holdout_distances.median())
    if holdout_median < 1e-12:
        raise ValueError(
            "the median nearest-neighbour distance of holdout to train is 0: holdout images duplicate training "
            "images, so the memorisation ratio is undefined; use a holdout set disjoint from train."
        )
    return float(sample_distances.median()) / holdout_median


def memorisation_check(
    samples: torch.Tensor,
    train: torch.Tensor,
    threshold: float = 0.15,
    data_range: float = 1.0,
    grid: int = 4,
    sample_features: torch.Tensor | None = None,
    train_features: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """MediSyn's copy check: the nearest training image of every generated sample by patch-max normalised L2.

    Args:
        samples, train: images ``[N, C, *spatial]`` and ``[M, C, *spatial]`` (2D or 3D) with intensities within
            ``data_range``.
        threshold: samples at a distance <= ``threshold`` are flagged as copies (MediSyn: 0.15).
        data_range, grid: see :func:`nearest_neighbour_distances` (``"patch_max"``).
        sample_features, train_features: optional embeddings ``[N, F]`` and ``[M, F]`` (e.g. from
            :func:`extract_features`); the nearest neighbour by cosine distance is reported as well.

    Returns:
        ``{"patch_max": {"threshold", "mean", "sd", "flagged_count", "flagged_fraction"}, "distances": [N],
        "nearest_index": [N]}`` plus ``"cosine": {"mean", "sd", "distances", "nearest_index"}`` with features.
    """
    distances, indices = nearest_neighbour_distances(samples, train, "patch_max", chunk_size, data_range, grid)
    flagged = distances <= threshold
    report: dict[str, Any] = {
        "patch_max": {
            "threshold": float(threshold),
            "mean": float(distances.mean()),
            "sd": float(distances.std()) if len(distances) > 1 else 0.0,
            "flagged_count": int(flagged.sum()),
            "flagged_fraction": float(flagged.double().mean()),
        },
        "distances": distances.tolist(),
        "nearest_index": indices.tolist(),
    }
    if (sample_features is None) != (train_features is None):
        raise ValueError("give both sample_features and train_features, or neither.")
    if sample_features is not None:
        _check_features("sample_features", sample_features, min_rows=1)
        _check_features("train_features", train_features, min_rows=1)
        if len(sample_features) != len(samples) or len(train_features) != len(train):
            raise ValueError(
                f"need one feature row per image: {len(sample_features)} for {len(samples)} samples, "
                f"{len(train_features)} for {len(train)} training images."
            )
        a = torch.nn.functional.normalize(sample_features.double(), dim=1)
        b = torch.nn.functional.normalize(train_features.double(), dim=1)
        cosine, nearest = (1 - a @ b.T).min(dim=1)
        report["cosine"] = {
            "mean": float(cosine.mean()),
            "sd": float(cosine.std()) if len(cosine) > 1 else 0.0,
            "distances": cosine.tolist(),
            "nearest_index": nearest.tolist(),
        }
    return report
