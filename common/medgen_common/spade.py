"""Image synthesis with the SPADE VAE-GAN of brainSPADE: inference items, the style-rejection inferer and the
contrast checks of the evaluation.

- :func:`make_synthesis_items`: one item per label map and contrast, each with ``tries`` style slices of that
  contrast drawn from a pool of real images.
- :class:`StyleSpadeInferer`: label + style -> image; with a contrast classifier, a generated image whose
  requested contrast gets a probability below ``threshold`` is regenerated from the next style slice (the
  brainSPADE 2D rejection loop).
- :func:`tissue_means` and :func:`intensity_ordering`: mean intensity of each tissue inside the label's argmax and
  the order of the tissues by it (T1: WM > GM > CSF; T2: CSF > GM > WM).
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.inferers import Inferer, sliding_window_inference
from torch import nn

__all__ = ["make_synthesis_items", "StyleSpadeInferer", "tissue_means", "intensity_ordering", "synthesis_report"]


def make_synthesis_items(
    label_files: Sequence[str],
    style_pool: dict[str, Sequence[str]],
    contrasts: Sequence[str],
    tries: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Items ``{"label", "style": [tries paths], "contrast", "contrast_name", "output_name"}``, one per label map and
    contrast, in label order then contrast order. Styles are drawn without replacement (with replacement when the
    pool is smaller than ``tries``) from ``style_pool[contrast]``, seeded.

    Raises:
        ValueError: no label files, a contrast missing from the pool or with an empty pool, or ``tries < 1``.
    """
    if len(label_files) == 0:
        raise ValueError("no label maps to synthesise images for.")
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}.")
    for contrast in contrasts:
        if len(style_pool.get(contrast, ())) == 0:
            raise ValueError(f"no style images of contrast '{contrast}' (pool has {sorted(style_pool)}).")
    rng = np.random.default_rng(seed)
    items = []
    for label in label_files:
        stem = str(label).rsplit("/", 1)[-1].removesuffix(".nii.gz").removesuffix(".nii").removesuffix("_label")
        for index, contrast in enumerate(contrasts):
            pool = list(style_pool[contrast])
            picks = rng.choice(len(pool), size=tries, replace=len(pool) < tries)
            items.append(
                {"label": label, "style": [pool[i] for i in picks], "contrast": index, "contrast_name": contrast,
                 "output_name": f"{stem}_{contrast}"}
            )  # fmt: skip
    return items


class StyleSpadeInferer(Inferer):
    """Generate images from label maps ``[B, C, *spatial]`` and candidate style slices ``[B, K, H, W]``.

    Try ``k = 0, 1, ...``: decode with style ``k`` (the posterior mean code, or a sample with ``sample_style``); with
    a ``classifier`` (2D), keep a sample once its requested contrast has probability >= ``threshold``, else move to
    the next style. Samples never accepted keep the most probable try. Without a classifier the first style is used.
    After a call, ``last_tries`` ``[B]`` and ``last_probability`` ``[B]`` (NaN without a classifier) describe it.

    With ``roi_size`` (a generator trained on patches, e.g. 1 mm axial chunks), the label map is decoded by MONAI's
    sliding-window inference over patches of that size, every patch with the same style code.
    """

    def __init__(
        self, classifier: nn.Module | None = None, threshold: float = 0.75, sample_style: bool = False,
        roi_size: Sequence[int] | None = None, overlap: float = 0.25,
    ):  # fmt: skip
        super().__init__()
        self.classifier, self.threshold, self.sample_style = classifier, threshold, sample_style
        self.roi_size, self.overlap = roi_size, overlap
        self.last_tries = self.last_probability = torch.empty(0)

    def _decode(self, network: nn.Module, labels: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        if self.roi_size is None or list(self.roi_size) == list(labels.shape[2:]):
            return network.decode(labels, code)
        return torch.cat([
            sliding_window_inference(
                label[None], list(self.roi_size), sw_batch_size=1, overlap=self.overlap, mode="gaussian",
                predictor=lambda patches, z=z: network.decode(patches, z[None].expand(patches.shape[0], -1)),
            )
            for label, z in zip(labels, code)
        ])  # fmt: skip

    def __call__(  # type: ignore[override]
        self, labels: torch.Tensor, network: nn.Module, styles: torch.Tensor, contrast: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        if styles.ndim != 4:
            raise ValueError(f"styles must be [B, K, H, W] (K candidate slices per sample), got {tuple(styles.shape)}.")
        batch, candidates = styles.shape[:2]
        output = probability = tries = None
        pending = torch.ones(batch, dtype=torch.bool, device=labels.device)
        for k in range(candidates):
            mu, logvar = network.encode(styles[:, k : k + 1])
            code = network.sample(mu, logvar) if self.sample_style else mu
            images = self._decode(network, labels, code)
            if self.classifier is None:
                output, tries = images, torch.ones(batch, dtype=torch.long)
                probability = torch.full((batch,), float("nan"))
                break
            contrast_logits, _ = self.classifier.split(self.classifier(images))
            p = torch.softmax(contrast_logits.float(), 1).gather(1, contrast.long().view(-1, 1).to(labels.device)).squeeze(1)
            if output is None:
                output, probability, tries = images, p, torch.ones(batch, dtype=torch.long, device=labels.device)
            else:
                better = pending & (p > probability)
                output = torch.where(better.view(-1, *[1] * (images.ndim - 1)), images, output)
                probability = torch.where(better, p, probability)
                tries = torch.where(pending, torch.full_like(tries, k + 1), tries)
            pending = pending & (probability < self.threshold)
            if not pending.any():
                break
        self.last_tries, self.last_probability = tries.cpu(), probability.cpu()
        return output


def tissue_means(images: torch.Tensor, labels: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """Mean intensity of ``images`` ``[B, 1, *spatial]`` inside the argmax region of each label channel in
    ``channels`` (labels ``[B, C, *spatial]``), ``[B, len(channels)]``; NaN where a tissue is absent."""
    hard = labels.argmax(1)
    means = torch.full((images.shape[0], len(channels)), float("nan"))
    for b in range(images.shape[0]):
        for i, channel in enumerate(channels):
            region = hard[b] == channel
            if region.any():
                means[b, i] = images[b, 0][region].float().mean()
    return means


def intensity_ordering(means: torch.Tensor, names: Sequence[str]) -> list[tuple[str, ...]]:
    """Tissue names of each row of ``means`` ``[B, T]`` from brightest to darkest (e.g. ``("wm", "gm", "csf")``)."""
    return [tuple(names[i] for i in torch.argsort(row, descending=True).tolist()) for row in means]


def _load_channel_first(path: str) -> torch.Tensor:
    """A NIfTI file as a float tensor: label maps (X, Y, [1,] C) -> [C, X, Y(, Z)], images -> [1, X, Y(, Z)]."""
    array = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    if array.ndim == 4:  # channel-last label map
        array = np.moveaxis(array, -1, 0)
    else:
        array = array[None]
    if array.shape[-1] == 1:  # 2D slice stored as X x Y x 1
        array = array[..., 0]
    return torch.from_numpy(np.ascontiguousarray(array))


def synthesis_report(
    items: Sequence[dict],
    output_dir: str,
    channel_names: Sequence[str],
    real_pool: dict[str, Sequence[str]],
    real_labels: Sequence[str],
    tissues: Sequence[str] = ("csf", "gm", "wm"),
    classifier: nn.Module | None = None,
) -> dict:
    """Does each generated image keep the contrast of its style? Reads the images the inference wrote
    (``output_dir/<output_name>.nii.gz``) and their label maps and reports:

    - ``expected_ordering``: per contrast, tissues from brightest to darkest in the real images of ``real_pool``
      (paired with ``real_labels`` in order), e.g. T1 ``wm > gm > csf``, T2 ``csf > gm > wm``;
    - ``ordering_match_rate``: per contrast and overall, the fraction of generated images whose ordering of mean
      tissue intensity (inside the label's argmax) is the expected one;
    - ``style_swap_rate``: per pair of contrasts (``"t1-t2"``) and for all of them together (``"all"``), the fraction
      of label maps whose images of those contrasts each have their own contrast's ordering: swapping the style of a
      fixed label changes the ordering accordingly (pairs whose expected orderings are equal are left out);
    - ``classifier_accuracy``: with a classifier, the fraction of generated 2D images it assigns to the requested
      contrast.
    """
    channels = [list(channel_names).index(name) for name in tissues]
    contrasts = sorted({(item["contrast"], item["contrast_name"]) for item in items})
    expected = {}
    labels = [_load_channel_first(path) for path in real_labels]
    for _, name in contrasts:
        images = [_load_channel_first(path) for path in real_pool[name]]
        means = torch.cat([tissue_means(i[None], l[None], channels) for i, l in zip(images, labels)])
        expected[name] = intensity_ordering(torch.nanmean(means, 0, keepdim=True), tissues)[0]
    matches: dict[str, list[bool]] = {name: [] for _, name in contrasts}
    by_label: dict[str, dict[str, bool]] = {}
    predictions = []
    for item in items:
        image = _load_channel_first(f"{output_dir}/{item['output_name']}.nii.gz")
        label = _load_channel_first(item["label"])
        ordering = intensity_ordering(tissue_means(image[None], label[None], channels), tissues)[0]
        match = ordering == expected[item["contrast_name"]]
        matches[item["contrast_name"]].append(match)
        by_label.setdefault(str(item["label"]), {})[item["contrast_name"]] = match
        if classifier is not None and image.ndim == 3:
            with torch.no_grad():
                logits = classifier.split(classifier(image[None].to(next(classifier.parameters()).device)))[0]
            predictions.append(int(logits.argmax(1)) == int(item["contrast"]))
    every = [m for values in matches.values() for m in values]
    report = {
        "num_images": len(items),
        "tissues": list(tissues),
        "expected_ordering": {name: " > ".join(order) for name, order in expected.items()},
        "ordering_match_rate": {
            **{name: float(np.mean(values)) for name, values in matches.items()}, "all": float(np.mean(every))
        },
        "style_swap_rate": {
            **{
                f"{a}-{b}": float(np.mean([m[a] and m[b] for m in by_label.values() if a in m and b in m]))
                for i, (_, a) in enumerate(contrasts) for _, b in contrasts[i + 1 :] if expected[a] != expected[b]
            },
            "all": float(np.mean([all(m.values()) for m in by_label.values()])),
        },
    }
    if predictions:
        report["classifier_accuracy"] = float(np.mean(predictions))
    return report
