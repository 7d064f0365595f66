"""Three-fold validation of the msk_csg bundle (csg spec §5): segmentation, similarity metrics, visual Turing test.

Pure functions; the bundle's ``evaluate`` workflow calls :func:`csg_report`, which runs all of them.

- Similarity (paper Table 3, §5.2): :func:`intensity_similarity` (two-sample Kolmogorov-Smirnov and KL divergence
  of pixel intensities, the always-available reading of the paper's KST/KLD) and :func:`feature_fid` (Fréchet
  distance of features of a pluggable extractor). Offline the extractor is
  :class:`~medgen_common.metrics.RandomFeatureExtractor`, reported as "FID (random-feature extractor)": its numbers
  compare settings of this run with each other, never with the paper's Inception FID (7.8 / 24.2).
- Segmentation (Table 2, §5.1): :func:`segmentation_scores` gives DSC, IoU, PPV and TPR per class of class-index
  maps; :func:`mask_following` scores a segmenter trained on real images against the masks the generated images
  were conditioned on; :func:`csg_report` also trains segmenters on real and real + synthetic images.
- Context following (§8.3): :func:`context_following`, the fraction of generated images whose Gram-nearest real
  image was acquired with the context image's device.
- Visual Turing test (§5.3): the shared :func:`~medgen_common.reader_study.export_reader_study` writes a blinded
  rater kit and an answer key; :func:`~medgen_common.reader_study.score_reader_study` scores a filled-in form.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImage
from monai.utils import convert_to_tensor, optional_import
from scipy import stats
from torch import nn

from .context_selection import GramDescriptor, RandomFeatureGramDescriptor, compute_style_descriptors, load_grey_image
from .csg import CsgSampler
from .demo_data.ultrasound import CLASS_NAMES
from .metrics import RandomFeatureExtractor, extract_features, frechet_distance
from .reader_study import export_reader_study
from .segmentation_utility import normalise_image, train_segmenter
from .writers import save_png_grid, write_json

tqdm, _ = optional_import("tqdm", name="tqdm")

__all__ = [
    "DEFAULT_GUIDANCE_SETTINGS",
    "RANDOM_FEATURE_FID_NAME",
    "intensity_similarity",
    "feature_fid",
    "segmentation_scores",
    "mask_following",
    "context_following",
    "csg_report",
]

#: Guidance settings ``name: (s_S, s_C)`` compared by :func:`csg_report` (Eq. 1; (1, 1) is plain conditional).
DEFAULT_GUIDANCE_SETTINGS = {
    "paper": (1.5, 2.5),
    "semantic_only": (1.5, 0.0),
    "plain": (1.0, 1.0),
    "unconditional": (0.0, 0.0),
}
#: How the report names FID computed with the offline default extractor.
RANDOM_FEATURE_FID_NAME = "FID (random-feature extractor)"
# independent seed streams of csg_report: test samples, synthetic training samples, the synthetic subset
_TEST_SEEDS, _SYNTHETIC_SEEDS, _SUBSET_SEEDS = range(3)


# ---------------------------------------------------------------------------------------------------------------------
# Similarity


def _pixels(images) -> np.ndarray:
    """All intensities of a tensor, an array or a sequence of them, pooled into one float64 vector."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = [images]
    parts = [torch.as_tensor(image).detach().cpu().double().flatten().numpy() for image in images]
    pooled = np.concatenate(parts) if parts else np.empty(0)
    if pooled.size == 0:
        raise ValueError("intensity_similarity needs at least one pixel in each set.")
    return pooled


def intensity_similarity(
    real_images, synthetic_images, bins: int = 32, value_range: Sequence[float] = (0.0, 1.0), epsilon: float = 1e-6
) -> dict[str, float]:
    """Distance between the pooled pixel intensities of two image sets (paper Table 3's KST and KLD, in pixels).

    - KS: scipy's two-sample Kolmogorov-Smirnov test, the largest gap between the two empirical CDFs. Pixels of an
      image are not independent, so the p-value is far too small for images that differ little; compare statistics.
    - KL: ``KL(P_real || Q_synthetic) = sum_b p_b log(p_b / q_b)`` in nats, over ``bins`` equal bins of
      ``value_range`` (values outside fall in the edge bins); ``epsilon`` is added to every bin probability, which
      is then renormalised, so empty synthetic bins give a large but finite value.

    Args:
        real_images, synthetic_images: tensors or arrays of any shape (e.g. ``[N, 1, H, W]`` in [0, 1]), or
            sequences of them.
        bins: histogram bins (32 fits 8-bit and 5-bit displays alike).
        value_range: intensity range of the histogram.
        epsilon: smoothing added to each bin probability.

    Returns:
        ``{"ks_statistic", "ks_pvalue", "kl_divergence"}``; statistic and divergence are 0 for identical sets.
    """
    if bins < 1 or epsilon <= 0:
        raise ValueError(f"bins must be >= 1 and epsilon > 0, got bins={bins} and epsilon={epsilon}.")
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {tuple(value_range)}.")
    real, synthetic = _pixels(real_images), _pixels(synthetic_images)
    ks = stats.ks_2samp(real, synthetic)

    def histogram(values: np.ndarray) -> np.ndarray:
        counts, _ = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))
        probabilities = counts / counts.sum() + epsilon
        return probabilities / probabilities.sum()

    p, q = histogram(real), histogram(synthetic)
    return {
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "kl_divergence": float(np.sum(p * np.log(p / q))),
    }


def feature_fid(
    real_images: torch.Tensor,
    synthetic_images: torch.Tensor,
    extractor: nn.Module | None = None,
    batch_size: int = 32,
) -> float:
    """Fréchet distance between feature Gaussians of real and synthetic images.

    Args:
        real_images, synthetic_images: ``[N, C, H, W]`` (at least 2 each), as the extractor expects them.
        extractor: maps images to features ``[N, F]``; None uses ``RandomFeatureExtractor(2, C, seed=0)``, whose
            value must be reported as :data:`RANDOM_FEATURE_FID_NAME`, not as Inception FID.
        batch_size: images per forward pass.

    Returns:
        The distance (>= 0 up to rounding; 0 for identical sets). Few images bias it upwards: compare only values
        computed from equally many images.
    """
    if extractor is None:
        extractor = RandomFeatureExtractor(spatial_dims=real_images.ndim - 2, in_channels=real_images.shape[1])
    real = extract_features(extractor, real_images, batch_size=batch_size)
    synthetic = extract_features(extractor, synthetic_images, batch_size=batch_size)
    return frechet_distance(synthetic, real)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _nanmean(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"class_{index}" for index in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes: {list(class_names)}.")
    return list(class_names)


def segmentation_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    include_background: bool = False,
) -> dict[str, dict]:
    """DSC, IoU, PPV and TPR per class of class-index maps, from pixel counts pooled over all images.

    With TP, FP, FN a class's pooled counts: ``DSC = 2TP / (2TP + FP + FN)``, ``IoU = TP / (TP + FP + FN)``,
    ``PPV = TP / (TP + FP)``, ``TPR = TP / (TP + FN)``. Pooling (not averaging per image) keeps the identity of the
    paper's Table 3, ``IoU = 1 / (1/PPV + 1/TPR - 1)`` (and ``DSC = 2 PPV TPR / (PPV + TPR)``), exact per class.

    Args:
        pred, target: class indices of the same shape, e.g. ``[N, H, W]``, values in ``[0, num_classes)``.
        num_classes: number of classes, background (index 0) included.
        class_names: a name per class; default ``class_0``, ...
        include_background: also score class 0.

    Returns:
        ``{"per_class": {name: {"dsc", "iou", "ppv", "tpr", "target_pixels", "predicted_pixels"}}, "mean": {"dsc",
        "iou", "ppv", "tpr"}}``. A ratio with a zero denominator is NaN (a class absent from target and prediction
        is NaN throughout; one only predicted scores DSC, IoU and PPV 0). ``mean`` averages the classes present in
        the target (as MONAI's ``DiceMetric(ignore_empty=True)``), skipping NaN; the identity does not hold for
        means.
    """
    names = _class_names(num_classes, class_names)
    pred, target = torch.as_tensor(pred).long().cpu(), torch.as_tensor(target).long().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")
    for name, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} holds class indices outside [0, {num_classes}): {int(labels.min())} to {int(labels.max())}."
            )
    # confusion[t, p]: pixels of true class t predicted as p
    confusion = torch.bincount(target.flatten() * num_classes + pred.flatten(), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    true_positive = confusion.diagonal()
    target_pixels, predicted_pixels = confusion.sum(dim=1), confusion.sum(dim=0)
    per_class = {}
    for index in range(0 if include_background else 1, num_classes):
        tp = float(true_positive[index])
        fp, fn = float(predicted_pixels[index]) - tp, float(target_pixels[index]) - tp
        per_class[names[index]] = {
            "dsc": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "ppv": _ratio(tp, tp + fp),
            "tpr": _ratio(tp, tp + fn),
            "target_pixels": int(target_pixels[index]),
            "predicted_pixels": int(predicted_pixels[index]),
        }
    present = [scores for scores in per_class.values() if scores["target_pixels"] > 0]
    mean = {key: _nanmean([scores[key] for scores in present]) for key in ("dsc", "iou", "ppv", "tpr")}
    return {"per_class": per_class, "mean": mean}


@torch.no_grad()
def _predict(segmenter: nn.Module, images: torch.Tensor, normalisation: str, batch_size: int) -> torch.Tensor:
    """Class indices ``[N, H, W]`` of images ``[N, 1, H, W]``, normalised as the segmenter's training items were."""
    was_training = segmenter.training
    segmenter.eval()
    parameter = next(segmenter.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    normalised = torch.stack([normalise_image(image[0].cpu().numpy(), normalisation) for image in images])
    predictions = [
        segmenter(normalised[start : start + batch_size].to(device)).argmax(dim=1).cpu()
        for start in range(0, normalised.shape[0], batch_size)
    ]
    segmenter.train(was_training)
    return torch.cat(predictions)


def mask_following(
    segmenter: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    normalisation: str = "zscore",
    batch_size: int = 32,
) -> dict[str, dict]:
    """Does a generated image show its conditioning mask? Segment it with a segmenter trained on real images and
    score the prediction against the mask (:func:`segmentation_scores`, background left out).

    Args:
        segmenter: maps ``[B, 1, H, W]`` to logits ``[B, num_classes, H, W]``, e.g. from
            :func:`~medgen_common.segmentation_utility.train_segmenter`.
        images: ``[N, 1, H, W]`` in [0, 1].
        masks: class indices ``[N, H, W]`` or ``[N, 1, H, W]``.
        num_classes, class_names: see :func:`segmentation_scores`.
        normalisation: the segmenter's training normalisation, see
            :func:`~medgen_common.segmentation_utility.normalise_image`.
        batch_size: images per forward pass.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [N, 1, H, W], got shape {tuple(images.shape)}.")
    masks = masks[:, 0] if masks.ndim == 4 else masks
    if masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}.")
    prediction = _predict(segmenter, images, normalisation, batch_size)
    return segmentation_scores(prediction, masks, num_classes, class_names)


# ---------------------------------------------------------------------------------------------------------------------
# Context following


def context_following(
    generated_images: torch.Tensor,
    context_devices: Sequence[Hashable],
    reference_images: torch.Tensor,
    reference_devices: Sequence[Hashable],
    descriptor: GramDescriptor | None = None,
    mask_devices: Sequence[Hashable] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Does a generated image take the style of its context? Find each generated image's nearest real reference
    image by style (Gram descriptors, :func:`~medgen_common.context_selection.compute_style_descriptors`, MSE) and
    check whether it was acquired with the context image's device.

    Args:
        generated_images: ``[N, 1, H, W]`` in [0, 1].
        context_devices: the device of each generated image's context image (length ``N``).
        reference_images: real images ``[M, 1, H', W']`` in [0, 1] (e.g. the training set).
        reference_devices: the device of each reference image (length ``M``).
        descriptor: the style descriptor; None uses ``RandomFeatureGramDescriptor(seed=0)``.
        mask_devices: the device of each conditioning mask's own image, when known (length ``N``).
        batch_size: images per descriptor forward pass.

    Returns:
        ``{"context_device_match": fraction, "mask_device_match": fraction or None, "chance": 1 / num_devices,
        "num_devices": number of distinct reference devices}``. Chance assumes the reference devices are about
        equally common.
    """
    count = generated_images.shape[0]
    checks = [("context_devices", context_devices, count)]
    checks.append(("reference_devices", reference_devices, reference_images.shape[0]))
    if mask_devices is not None:
        checks.append(("mask_devices", mask_devices, count))
    for name, values, expected in checks:
        if len(values) != expected:
            raise ValueError(f"{name} must give one device per image ({expected}), got {len(values)}.")
    descriptor = RandomFeatureGramDescriptor(seed=0) if descriptor is None else descriptor
    generated = compute_style_descriptors(generated_images, descriptor, batch_size=batch_size).double()
    reference = compute_style_descriptors(reference_images, descriptor, batch_size=batch_size).double()
    squared = generated.square().sum(1, keepdim=True) + reference.square().sum(1) - 2 * generated @ reference.T
    nearest = (squared / generated.shape[1]).argmin(dim=1).tolist()  # MSE between descriptors
    nearest_devices = [reference_devices[index] for index in nearest]

    def match(devices: Sequence[Hashable]) -> float:
        return sum(found == wanted for found, wanted in zip(nearest_devices, devices)) / count

    num_devices = len(set(reference_devices))
    return {
        "context_device_match": match(context_devices),
        "mask_device_match": None if mask_devices is None else match(mask_devices),
        "chance": 1.0 / num_devices,
        "num_devices": num_devices,
    }


# ---------------------------------------------------------------------------------------------------------------------
# The whole protocol


def _grey_image(value) -> torch.Tensor:
    """A path (read with :func:`load_grey_image`, stored range [0, 1]) or an array ``[H, W]``, ``[1, H, W]`` or
    ``[H, W, 1]`` as ``[1, H, W]`` float32."""
    if isinstance(value, (str, os.PathLike)):
        return load_grey_image(value)
    image = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)).float()
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    image = image[None] if image.ndim == 2 else image
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"a grey image must be [H, W], [1, H, W] or [H, W, 1], got shape {tuple(image.shape)}.")
    return image


def _mask(value) -> torch.Tensor:
    """A class-index mask path or array (``[H, W]``, ``[1, H, W]`` or ``[H, W, 1]``) as ``[H, W]`` int64."""
    if isinstance(value, (str, os.PathLike)):
        value = LoadImage(image_only=True)(os.fspath(value))
    mask = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value))
    mask = mask.squeeze()
    if mask.ndim != 2:
        raise ValueError(f"a mask must hold one 2D class-index map, got shape {tuple(mask.shape)}.")
    return mask.round().long()


def _load_entries(entries: Sequence[Mapping], keys: Sequence[str], num_classes: int, what: str) -> dict[str, Any]:
    """Entries as ``{"images" [N, 1, H, W], "masks" [N, H, W], "contexts" [N, 1, H, W] (when asked for), "devices",
    "context_devices"}``; image values are paths or arrays."""
    if len(entries) < 2:
        raise ValueError(f"{what} need at least 2 entries, got {len(entries)}.")
    for index, entry in enumerate(entries):
        missing = [key for key in keys if key not in entry]
        if missing:
            raise ValueError(f"{what} entry {index} misses key(s) {missing}; it has {sorted(entry)}.")
    loaded = {
        "images": torch.stack([_grey_image(entry["image"]) for entry in entries]),
        "masks": torch.stack([_mask(entry["label"]) for entry in entries]),
        "devices": [entry["device"] for entry in entries],
    }
    if loaded["masks"].min() < 0 or loaded["masks"].max() >= num_classes:
        raise ValueError(f"{what}: mask values must lie in [0, {num_classes}) for {num_classes} class names.")
    if loaded["masks"].shape[1:] != loaded["images"].shape[2:]:
        shapes = f"masks {tuple(loaded['masks'].shape)} and images {tuple(loaded['images'].shape)}"
        raise ValueError(f"{what}: the {shapes} differ in size.")
    if "context" in keys:
        loaded["contexts"] = torch.stack([_grey_image(entry["context"]) for entry in entries])
    if "context_device" in keys:
        loaded["context_devices"] = [entry["context_device"] for entry in entries]
    return loaded


def _seeds(seed: int, stream: int, count: int) -> list[int]:
    return np.random.default_rng([seed, stream]).integers(0, 2**31 - 1, size=count).tolist()


def _sample(
    sampler: CsgSampler,
    network: nn.Module,
    masks: torch.Tensor,
    contexts: torch.Tensor,
    seeds: Sequence[int],
    num_classes: int,
    batch_size: int,
    description: str,
    progress: bool,
) -> torch.Tensor:
    """Images ``[N, 1, H, W]`` (CPU) for masks ``[N, H, W]`` and contexts ``[N, 1, H, W]``, one seed each."""
    device = next(network.parameters()).device
    starts = range(0, masks.shape[0], batch_size)
    samples = []
    for start in tqdm(starts, desc=description, leave=False) if progress else starts:
        stop = start + batch_size
        label = torch.nn.functional.one_hot(masks[start:stop], num_classes).permute(0, 3, 1, 2).float()
        images = sampler(label.to(device), network, context=contexts[start:stop].to(device), seeds=seeds[start:stop])
        samples.append(convert_to_tensor(images, track_meta=False).cpu())  # the sampler returns MetaTensors
    return torch.cat(samples)


def _items(images: torch.Tensor, masks: torch.Tensor) -> list[dict]:
    """In-memory segmentation items ``{"image": H x W, "label": H x W}`` (``label_format="index"``)."""
    return [{"image": image[0].numpy(), "label": mask.numpy()} for image, mask in zip(images, masks)]


def csg_report(
    autoencoder: nn.Module,
    network: nn.Module,
    scheduler,
    scale_factor: float,
    test_entries: Sequence[Mapping],
    training_entries: Sequence[Mapping],
    output_dir: str | os.PathLike,
    class_names: Sequence[str] = CLASS_NAMES,
    guidance_settings: Mapping[str, Sequence[float]] | None = None,
    augmentation_settings: Sequence[str] = ("paper", "semantic_only"),
    turing_setting: str = "paper",
    num_inference_steps: int = 25,
    seed: int = 0,
    segmenter_steps: int = 400,
    segmenter_batch_size: int = 16,
    segmenter_lr: float = 3e-3,
    segmenter_channels: Sequence[int] = (8, 16, 32, 64),
    segmenter_normalisation: str = "zscore",
    num_synthetic: int | None = None,
    sample_batch_size: int = 16,
    descriptor: GramDescriptor | None = None,
    feature_extractor: nn.Module | None = None,
    feature_extractor_name: str | None = None,
    num_grid_columns: int = 8,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the three-fold validation on a trained CSG model and write ``evaluation.json``, PNG grids and the Turing
    test kit to ``output_dir``.

    1. One image per test pair and guidance setting (:class:`~medgen_common.csg.CsgSampler`); sample ``i`` has
       the same seed in every setting, so settings differ only by their guidance.
    2. A segmenter trained on the real training images
       (:func:`~medgen_common.segmentation_utility.train_segmenter`, index labels) gives ``mask_following`` per
       setting; the row ``real_test`` scores the real test images against their own masks (the ceiling).
    3. ``context_following`` per setting, the references being the real training images and their devices;
       ``real_test`` finds the real test images' own devices (the descriptor's ceiling).
    4. ``similarity`` per setting against the real test images: KS / KL of intensities and FID; the row
       ``real_training`` compares the real training images with them (the floor a generator can reach).
    5. ``segmentation_gain`` (paper Table 2): images generated from training masks with their contexts at each of
       ``augmentation_settings`` are added to the real training images; a segmenter per training set (same seed
       and steps as the real one) is scored on the real test images.
    6. The Turing kit (:func:`~medgen_common.reader_study.export_reader_study`): real test images and the ``turing_setting`` samples.

    Args:
        autoencoder, network, scheduler, scale_factor: the trained model, as for :class:`CsgSampler`.
        test_entries: test pairs ``{"image", "label", "context", "context_device", "device"}``: a mask, its real
            image and device, and a context image and its device; values are paths or arrays.
        training_entries: real training entries ``{"image", "label", "device"}`` and, for ``augmentation_settings``,
            ``"context"`` (the selected context).
        output_dir: where the results go.
        class_names: one name per class (background first); the mask values index them.
        guidance_settings: ``{name: (s_S, s_C)}``; default :data:`DEFAULT_GUIDANCE_SETTINGS`.
        augmentation_settings: settings whose synthetic training images are tested in ``segmentation_gain``.
        turing_setting: the setting whose samples go into the Turing kit.
        num_inference_steps: denoising steps.
        seed: seeds the samples, the synthetic subset, the segmenters and the Turing shuffle.
        segmenter_steps, segmenter_batch_size, segmenter_lr, segmenter_channels: every segmenter's training.
        segmenter_normalisation: image normalisation of the segmenters (``"zscore"``, ``"none"``, ...).
        num_synthetic: synthetic training images per augmentation setting, from a seeded random subset of the
            training masks; None uses every training mask once.
        sample_batch_size: test pairs per sampler call.
        descriptor: style descriptor of ``context_following`` (default a seeded random-feature Gram descriptor).
        feature_extractor, feature_extractor_name: FID features and how to name them; default
            ``RandomFeatureExtractor``, named :data:`RANDOM_FEATURE_FID_NAME`.
        num_grid_columns: test pairs shown in the PNG grids.
        amp: autocast on CUDA while sampling.
        progress: progress bars for sampling and segmenter training.

    Returns:
        The report written to ``evaluation.json``: ``settings``, counts and training settings, ``fid_name``,
        ``mask_following`` / ``context_following`` / ``similarity`` (per setting plus the reference row),
        ``segmentation_gain`` (``training_sets``: ``{name: {"num_items", "scores"}}`` and
        ``mean_dsc_ratio_to_real``), ``turing_test`` and ``files`` (paths relative to ``output_dir``; the image grid
        has one row per entry of ``grid_images_rows``, one column per shown test pair).
    """
    guidance_settings = DEFAULT_GUIDANCE_SETTINGS if guidance_settings is None else guidance_settings
    settings = {name: (float(s), float(c)) for name, (s, c) in guidance_settings.items()}
    unknown = [name for name in (*augmentation_settings, turing_setting) if name not in settings]
    if unknown:
        raise ValueError(f"setting(s) {unknown} are not among the guidance settings {list(settings)}.")
    if feature_extractor is not None and feature_extractor_name is None:
        raise ValueError("name the feature_extractor (feature_extractor_name), e.g. 'Inception-v3 pool3'.")
    output_dir = Path(output_dir)
    num_classes = len(class_names)
    test_keys = ("image", "label", "context", "context_device", "device")
    test = _load_entries(test_entries, test_keys, num_classes, "test entries")
    training_keys = ("image", "label", "device", "context") if augmentation_settings else ("image", "label", "device")
    train = _load_entries(training_entries, training_keys, num_classes, "training entries")
    segmenter_settings = {
        "class_channels": list(range(num_classes)), "merge_into": 0, "steps": segmenter_steps,
        "batch_size": segmenter_batch_size, "lr": segmenter_lr, "seed": seed, "channels": tuple(segmenter_channels),
        "device": next(network.parameters()).device, "progress": progress, "label_format": "index",
        "normalisation": segmenter_normalisation,
    }  # fmt: skip
    samplers = {
        name: CsgSampler(autoencoder, scheduler, num_inference_steps, scale_factor, s_semantic, s_context, amp=amp)
        for name, (s_semantic, s_context) in settings.items()
    }
    test_seeds = _seeds(seed, _TEST_SEEDS, len(test_entries))
    samples = {
        name: _sample(sampler, network, test["masks"], test["contexts"], test_seeds, num_classes, sample_batch_size,
                      f"sampling '{name}'", progress)
        for name, sampler in samplers.items()
    }  # fmt: skip

    real_items = _items(train["images"], train["masks"])
    real_segmenter = train_segmenter(real_items, **segmenter_settings)

    def follows_masks(segmenter: nn.Module, images: torch.Tensor) -> dict:
        return mask_following(segmenter, images, test["masks"], num_classes, class_names, segmenter_normalisation)

    descriptor = RandomFeatureGramDescriptor(seed=0) if descriptor is None else descriptor
    extractor = feature_extractor if feature_extractor is not None else RandomFeatureExtractor(2, in_channels=1)

    def similarity(images: torch.Tensor) -> dict:
        return {**intensity_similarity(test["images"], images), "fid": feature_fid(test["images"], images, extractor)}

    def follows_contexts(images: torch.Tensor, devices: Sequence[Hashable], mask_devices=None) -> dict:
        return context_following(images, devices, train["images"], train["devices"], descriptor, mask_devices)

    real_scores = follows_masks(real_segmenter, test["images"])
    report: dict[str, Any] = {
        "settings": {name: {"semantic_scale": s, "context_scale": c} for name, (s, c) in settings.items()},
        "num_test_pairs": len(test_entries),
        "num_training_images": len(training_entries),
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "class_names": list(class_names),
        "segmenter": {
            "steps": segmenter_steps, "batch_size": segmenter_batch_size, "lr": segmenter_lr,
            "channels": list(segmenter_channels), "normalisation": segmenter_normalisation,
        },  # fmt: skip
        "fid_name": RANDOM_FEATURE_FID_NAME if feature_extractor is None else f"FID ({feature_extractor_name})",
        "mask_following": {"real_test": real_scores},
        "context_following": {"real_test": follows_contexts(test["images"], test["devices"])},
        "similarity": {"real_training": similarity(train["images"])},
    }
    for name, images in samples.items():
        report["mask_following"][name] = follows_masks(real_segmenter, images)
        report["context_following"][name] = follows_contexts(images, test["context_devices"], test["devices"])
        report["similarity"][name] = similarity(images)

    count = len(training_entries) if num_synthetic is None else min(int(num_synthetic), len(training_entries))
    chosen = torch.from_numpy(np.random.default_rng([seed, _SUBSET_SEEDS]).permutation(len(training_entries))[:count])
    synthetic_seeds = _seeds(seed, _SYNTHETIC_SEEDS, count)
    training_sets = {"real": {"num_items": len(real_items), "scores": real_scores}}
    for name in augmentation_settings:
        synthetic = _sample(
            samplers[name], network, train["masks"][chosen], train["contexts"][chosen], synthetic_seeds, num_classes,
            sample_batch_size, f"synthetic training images '{name}'", progress,
        )  # fmt: skip
        items = real_items + _items(synthetic, train["masks"][chosen])
        training_sets[f"real+synthetic ({name})"] = {
            "num_items": len(items),
            "scores": follows_masks(train_segmenter(items, **segmenter_settings), test["images"]),
        }
    real_dsc = real_scores["mean"]["dsc"]
    report["segmentation_gain"] = {
        "training_sets": training_sets,
        "mean_dsc_ratio_to_real": {
            name: _ratio(entry["scores"]["mean"]["dsc"], real_dsc) for name, entry in training_sets.items()
        },
    }

    turing = export_reader_study(test["images"], samples[turing_setting], output_dir / "turing_test", seed=seed)
    shown = slice(0, min(num_grid_columns, len(test_entries)))
    masks_one_hot = torch.nn.functional.one_hot(test["masks"][shown], num_classes).permute(0, 3, 1, 2)
    images_shown = [test["contexts"][shown], test["images"][shown], *(s[shown] for s in samples.values())]
    grid_masks = save_png_grid(
        list(masks_one_hot), output_dir / "grid_masks.png", kind="label", ncols=shown.stop, rotate=False
    )
    grid_images = save_png_grid(
        list(torch.cat(images_shown)),
        output_dir / "grid_images.png",
        ncols=shown.stop,
        value_range=(0, 1),
        rotate=False,
    )
    report["turing_test"] = {
        "setting": turing_setting,
        "answer_key": os.path.relpath(turing["answer_key"], output_dir),
        "responses": os.path.relpath(turing["responses"], output_dir),
        "num_real": turing["num_real"],
        "num_synthetic": turing["num_synthetic"],
    }
    report["files"] = {  # relative to output_dir
        "grid_masks": os.path.relpath(grid_masks, output_dir),
        "grid_images": os.path.relpath(grid_images, output_dir),
        "grid_images_rows": ["context", "real image of the mask", *samples],
    }
    write_json(report, output_dir / "evaluation.json")
    return report
