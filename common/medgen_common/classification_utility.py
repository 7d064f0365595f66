"""Does synthetic data help a downstream classifier? Train one classifier per training set, score each on real cases.

MediSyn's and EDM-Lx's protocol at CPU scale: the same small MONAI ``Classifier`` is trained on each named training
set (e.g. ``"real"``, ``"synthetic"``, ``"real+synthetic"``) with the same seed and step budget, and every set's
model scores the same real test images. Reported per set: accuracy and macro-AUROC, each with a bootstrap CI over
test patients, and the AUROC difference to the reference set (ΔAUROC) with a paired patient-level bootstrap CI.

Items are MONAI-style dicts holding one 2D image under ``image_key`` (a path or an array ``X x Y`` / ``X x Y x 1``),
an integer class under ``label_key`` and, for the test items, a patient id under ``group_key`` (several images of
one patient are resampled together; an item without one is its own patient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.nets import Classifier
from monai.utils import optional_import

from .downstream_statistics import bootstrap_metric_ci, delta_auroc_ci, macro_auroc
from .runtime import select_device
from .segmentation_utility import load_array, normalise_image, squeeze_slice
from .transforms import ImageFileError

tqdm, _ = optional_import("tqdm", name="tqdm")

__all__ = ["load_classification_set", "make_classifier", "train_classifier", "predict_probabilities",
           "compare_classification_sets", "format_classification_table"]  # fmt: skip


def load_classification_set(
    items: Sequence[Mapping], image_key: str, label_key: str, where: str, normalisation: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All items as ``(images [N, 1, X, Y] float32, labels [N] int64)``, normalised with
    :func:`~medgen_common.segmentation_utility.normalise_image`.

    Raises:
        ValueError: the set is empty, an item misses a key, its image is not one 2D slice, the shapes differ, or its
            label is not a non-negative integer; the message names the set and item.
    """
    if len(items) == 0:
        raise ValueError(f"{where} is empty: a classifier needs at least one item.")
    images, labels = [], []
    for index, item in enumerate(items):
        name = f"{where} item {index}"
        missing = [key for key in (image_key, label_key) if key not in item]
        if missing:
            raise ValueError(f"{name} misses key(s) {missing}; it has {sorted(item)}.")
        try:
            image = load_array(item[image_key], image_key)
        except ImageFileError as err:
            raise ImageFileError(f"{name}: {err}") from err
        image = squeeze_slice(image)
        if image.ndim != 2:
            raise ValueError(
                f"{name}: '{image_key}' must be one 2D slice, X x Y or X x Y x 1, got shape {image.shape}."
            )
        if not np.isfinite(image).all():
            raise ValueError(f"{name}: '{image_key}' contains NaN or Inf values.")
        if images and image.shape != tuple(images[0].shape[1:]):
            raise ValueError(f"{name} has shape {image.shape}, item 0 {tuple(images[0].shape[1:])}; use one shape.")
        label = item[label_key]
        if isinstance(label, bool) or not float(label).is_integer() or int(label) < 0:
            raise ValueError(f"{name}: '{label_key}' must be a non-negative integer class, got {label!r}.")
        images.append(normalise_image(image, normalisation))
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def make_classifier(
    in_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32, 64), dropout: float = 0.1
) -> Classifier:
    """MONAI's ``Classifier`` for images ``[B, *in_shape]`` (``in_shape`` = channels, H, W): a stride-2 residual
    unit per entry of ``channels``, logits ``[B, num_classes]``."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}.")
    return Classifier(
        in_shape=tuple(in_shape), classes=num_classes, channels=tuple(channels), strides=(2,) * len(channels),
        dropout=dropout,
    )  # fmt: skip


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 500,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels: Sequence[int] = (16, 32, 64),
    dropout: float = 0.1,
    flips: bool = True,
    progress: bool = False,
    description: str = "classifier",
) -> torch.nn.Module:
    """Train :func:`make_classifier` on ``images [N, C, H, W]`` and integer ``labels [N]`` with Adam and
    cross-entropy; each step draws ``batch_size`` images with replacement, flipped left-right at random when
    ``flips``. Equal inputs and seed give equal weights on CPU, and the caller's global random state is left alone.
    Returns the network in eval mode on ``device``."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need one label per image and at least one image, got {len(images)} images and {len(labels)} labels."
        )
    if steps < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(
            f"steps and batch_size must be >= 1 and learning_rate > 0, got {steps}, {batch_size}, {learning_rate}."
        )
    device = select_device(str(device))
    images, labels = images.float(), labels.long()
    bar = tqdm(total=steps, desc=description, leave=False) if progress else None
    with torch.random.fork_rng(devices=[]):  # seeds the weights and dropout, not the caller's stream
        torch.manual_seed(int(seed))
        generator = torch.Generator().manual_seed(int(seed))
        network = make_classifier(images.shape[1:], num_classes, channels, dropout).to(device)
        optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
        network.train()
        for _ in range(int(steps)):
            index = torch.randint(len(images), (min(int(batch_size), len(images)),), generator=generator)
            batch = images[index]
            if flips:
                flip = torch.rand(len(index), generator=generator) < 0.5
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            loss = torch.nn.functional.cross_entropy(network(batch.to(device)), labels[index].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return network.eval()


def predict_probabilities(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Softmax class probabilities ``[N, K]`` of ``images [N, 1, X, Y]``."""
    device = next(network.parameters()).device
    with torch.no_grad():
        chunks = [
            network(images[i : i + batch_size].to(device)).softmax(1).cpu() for i in range(0, len(images), batch_size)
        ]
    return torch.cat(chunks).double().numpy()


def compare_classification_sets(
    train_sets: Mapping[str, Sequence[Mapping]],
    test_items: Sequence[Mapping],
    image_key: str,
    label_key: str,
    group_key: str = "subject",
    reference: str = "real",
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels: Sequence[int] = (16, 32, 64),
    normalisation: str = "none",
    num_resamples: int = 2000,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one classifier per training set (:func:`train_classifier`: same seed, steps and network) and score each
    on the same real test items.

    Every set and the test items are loaded and checked before any training starts.

    Returns:
        ``{"reference", "num_items": {set: N}, "class_counts": {set: {class: N}}, "accuracy": {set: CI},
        "auroc": {set: CI}, "delta_auroc": {set: CI}, "test": {"items", "patients", "class_counts"}}``, where a CI is
        ``{"value" (or "delta"), "low", "high", "n"}`` from a bootstrap over test patients (``group_key``); the
        reference has no ``delta_auroc`` entry.

    Raises:
        ValueError: no sets, ``reference`` not among them, a set or the test items invalid, or images of different
            shapes.
    """
    if not train_sets:
        raise ValueError("train_sets is empty: name at least one training set.")
    if reference not in train_sets:
        raise ValueError(f"reference training set '{reference}' is not among the training sets {list(train_sets)}.")
    loaded = {
        name: load_classification_set(items, image_key, label_key, f"training set '{name}'", normalisation)
        for name, items in train_sets.items()
    }
    test_images, test_labels = load_classification_set(test_items, image_key, label_key, "test set", normalisation)
    shapes = {name: tuple(images.shape[2:]) for name, (images, _) in loaded.items()}
    if len(set(shapes.values()) | {tuple(test_images.shape[2:])}) > 1:
        raise ValueError(f"training and test images differ in shape: {shapes}, test {tuple(test_images.shape[2:])}.")
    num_classes = int(max(int(labels.max()) for _, labels in [*loaded.values(), (None, test_labels)])) + 1
    groups = [str(item.get(group_key, f"item {index}")) for index, item in enumerate(test_items)]
    labels = test_labels.numpy()
    probabilities = {}
    for name, (images, set_labels) in loaded.items():
        network = train_classifier(images, set_labels, num_classes, steps, batch_size, lr, seed, device, channels,
                                   progress=progress, description=name)  # fmt: skip
        probabilities[name] = predict_probabilities(network, test_images)

    def accuracy(scores: np.ndarray):
        return lambda index: float((scores[index].argmax(1) == labels[index]).mean())

    def auroc(scores: np.ndarray):
        return lambda index: macro_auroc(scores[index], labels[index])

    ci = {"groups": groups, "num_resamples": num_resamples, "seed": seed}
    return {
        "reference": reference,
        "num_items": {name: len(items) for name, items in train_sets.items()},
        "class_counts": {name: _counts(set_labels) for name, (_, set_labels) in loaded.items()},
        "accuracy": {name: bootstrap_metric_ci(accuracy(p), labels, **ci) for name, p in probabilities.items()},
        "auroc": {name: bootstrap_metric_ci(auroc(p), labels, **ci) for name, p in probabilities.items()},
        "delta_auroc": {
            name: delta_auroc_ci(p, probabilities[reference], labels, **ci)
            for name, p in probabilities.items()
            if name != reference
        },
        "test": {"items": len(test_items), "patients": len(set(groups)), "class_counts": _counts(test_labels)},
    }


def _counts(labels: torch.Tensor) -> dict[int, int]:
    values, counts = torch.unique(labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def format_classification_table(results: Mapping[str, Any], digits: int = 3) -> str:
    """:func:`compare_classification_sets` as a caption and a Markdown table: a row per training set with its size,
    accuracy and macro-AUROC (95 % CI) and ΔAUROC to the reference (95 % CI)."""

    def cell(ci: Mapping, key: str = "value") -> str:
        if not math.isfinite(ci[key]):
            return "n/a"
        return f"{ci[key]:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"

    reference, test = results["reference"], results["test"]
    lines = [
        f"Real test set: {test['items']} images of {test['patients']} patients; 95 % CIs by bootstrap over patients.",
        "",
        "| training set | items | accuracy | AUROC | ΔAUROC vs " + reference + " |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, size in results["num_items"].items():
        delta = cell(results["delta_auroc"][name], "delta") if name in results["delta_auroc"] else "–"
        lines.append(
            f"| {name} | {size} | {cell(results['accuracy'][name])} | {cell(results['auroc'][name])} | {delta} |"
        )
    return "\n".join(lines)
