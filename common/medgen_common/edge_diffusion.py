"""Edge- and text-guided latent diffusion (edge_guided_ldm; EMIT-Diff, other_seeds spec section 1).

The denoiser is the text-conditioned U-Net of :mod:`.text_diffusion` plus a MONAI ``ControlNet`` that reads an edge
map at image resolution and adds its residuals to the U-Net's skip connections and middle block
(:class:`EdgeControlledUNet`, ``e(z_t, c_text, c_edge, t)``, S2:L102). MONAI initialises the ControlNet's output
convolutions to zero, so a fresh branch changes nothing and training starts from the text-only model.

- :class:`EdgeDiffusionPrepareBatch` / :class:`EdgeDiffusionInferer`: training with the noise (L_simple) target,
  the prompt dropped for classifier-free guidance, the edges always kept (EMIT-Diff guides on text only);
- :class:`EdgeLatentSampler`: guided sampling from prompts and edge maps with the shared guidance code;
- :func:`augmented_prompts` / :func:`generate_augmentations`: Algorithm 1, ``n`` samples per real image from its
  edges and its prompt plus an augmentation phrase, written with a datalist that keeps each source's label;
- :func:`edge_fidelity_report`: edge F1 of generated images against their conditioning edges (and against another
  case's edges, the control) and paired fidelity to the source images;
- :class:`GreyscaleHead`: the cross-channel average that turns an RGB decoder's output grey (S2:L102).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.inferers import Inferer
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor
from torch import nn

from .datalist import load_datalist
from .edges import edge_f1, edge_map, image_edges
from .guidance import CONTEXT, classifier_free_guidance, guided_sample
from .metrics import paired_fidelity
from .runtime import autocast_dtype, autocast_enabled
from .text import vocabulary_of
from .text_diffusion import TextConditionedUNet, TextDiffusionPrepareBatch
from .writers import save_nifti, save_png_grid, write_json

__all__ = [
    "AUGMENTATION_PHRASES",
    "EdgeControlledUNet",
    "EdgeDiffusionPrepareBatch",
    "EdgeDiffusionInferer",
    "EdgeLatentSampler",
    "GreyscaleHead",
    "augmented_prompts",
    "RandAugmentationPhrased",
    "prompt_vocabulary",
    "task_entries",
    "generate_augmentations",
    "edge_fidelity_report",
]

logger = logging.getLogger(__name__)

# EMIT-Diff's examples (S2:L132, L139-140) and a few of the same kind
AUGMENTATION_PHRASES = ("enhanced contrast", "high resolution", "sharp edges", "low noise", "bright", "dark")
# the words of "modality, organ, category" prompts the demo tasks and common extensions use (word tokenizer)
PROMPT_TERMS = (
    "ultrasound", "MR T2", "MR ADC", "MR DWI", "CT",
    "breast", "prostate", "abdomen", "spleen", "liver", "kidney", "brain",
    "benign lesion", "malignant lesion", "soft lesion", "suspicious lesion", "no lesion", "normal", "gland", "organ",
)  # fmt: skip


def prompt_vocabulary() -> list[str]:
    """The word tokenizer's vocabulary: :data:`PROMPT_TERMS`, :data:`AUGMENTATION_PHRASES` and the comma."""
    return vocabulary_of([*PROMPT_TERMS, *AUGMENTATION_PHRASES, ","])


class EdgeControlledUNet(nn.Module):
    """A :class:`~medgen_common.text_diffusion.TextConditionedUNet` with a MONAI ``ControlNet`` on an edge map.

    Args:
        base: the text-conditioned U-Net (its ``unet`` a ``DiffusionModelUNet`` with cross-attention).
        controlnet: a ``ControlNet`` with the U-Net's channels, levels and cross-attention width, whose
            ``conditioning_embedding_num_channels`` bring the edge map ``[B, 1, H, W]`` down to the latent size.
        conditioning_scale: weight of the ControlNet residuals.
    """

    def __init__(self, base: TextConditionedUNet, controlnet: nn.Module, conditioning_scale: float = 1.0):
        super().__init__()
        self.base, self.controlnet, self.conditioning_scale = base, controlnet, float(conditioning_scale)

    def encode_context(self, tokens: torch.Tensor, keep_text: torch.Tensor | None = None) -> torch.Tensor:
        """Text context ``[B, L, d]``; the -1 null where ``keep_text`` is False."""
        return self.base.encode_context(tokens, None, keep_text)

    def forward(self, x, timesteps, context=None, tokens=None, keep_text=None, edges=None):
        """Noise prediction for latents ``x`` ``[B, C, h, w]`` given the text (``context`` ``[B, L, d]`` or
        ``tokens`` ``[B, L]``) and ``edges`` ``[B, 1, H, W]``."""
        if tokens is not None:
            if context is not None:
                raise ValueError("give either context or tokens, not both.")
            context = self.encode_context(tokens, keep_text)
        if context is None or edges is None:
            raise ValueError("an edge-controlled U-Net needs the text (context or tokens) and the edges.")
        if edges.shape[0] != x.shape[0]:
            raise ValueError(f"edges have batch {edges.shape[0]}, the latents {x.shape[0]}.")
        down, middle = self.controlnet(
            x, timesteps, controlnet_cond=edges.to(x.dtype), conditioning_scale=self.conditioning_scale, context=context
        )
        return self.base.unet(
            x, timesteps, context=context, down_block_additional_residuals=down, mid_block_additional_residual=middle
        )


class EdgeDiffusionPrepareBatch(TextDiffusionPrepareBatch):
    """Training batch: :class:`~medgen_common.text_diffusion.TextDiffusionPrepareBatch` (text only) plus the
    ``edges`` ``[B, 1, H, W]`` of the batch, never dropped."""

    def __init__(self, num_train_timesteps: int, autoencoder: nn.Module, scale_factor: float = 1.0,
                 p_text_dropped: float = 0.1):  # fmt: skip
        super().__init__(num_train_timesteps, autoencoder, scale_factor, "none", None, p_text_dropped, 0.0, 0.0)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        latents, noise, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        edges = convert_to_tensor(batchdata["edges"], track_meta=False).to(device, non_blocking=non_blocking)
        return latents, noise, args, {**infer_kwargs, "edges": edges.float()}


class EdgeDiffusionInferer(Inferer):
    """Training forward pass: noise the latents at ``timesteps`` and predict the noise from text and edges."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler

    def __call__(self, inputs, network, noise, timesteps, tokens, edges, keep_text=None):  # type: ignore[override]
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        return network(noisy, timesteps, tokens=tokens, keep_text=keep_text, edges=edges)


class _EdgesBound(nn.Module):
    """``network(x, t, context)`` with the edges bound, repeated for the guidance branches stacked along the batch
    (branch-major, see :meth:`~medgen_common.guidance.GuidanceRule.network_input`)."""

    def __init__(self, network: EdgeControlledUNet, edges: torch.Tensor):
        super().__init__()
        self.network, self.edges = network, edges

    def forward(self, x, timesteps, context=None):
        return self.network(
            x, timesteps, context=context, edges=self.edges.repeat(x.shape[0] // len(self.edges), 1, 1, 1)
        )


class EdgeLatentSampler(Inferer):
    """Sample images from prompts (tokens ``[B, L]``) and edge maps ``[B, 1, H, W]`` with classifier-free guidance of
    ``text_scale`` on the text (the edges are in every branch); returns decoded ``[B, 1, H, W]`` in [0, 1].
    ``last_nfe`` holds the network calls of the last batch."""

    def __init__(
        self,
        autoencoder: nn.Module,
        scheduler,
        num_inference_steps: int,
        latent_shape: Sequence[int],
        scale_factor: float = 1.0,
        text_scale: float = 3.0,
        amp: bool = True,
        verbose: bool = False,
    ):
        super().__init__()
        self.autoencoder, self.scheduler = autoencoder, scheduler
        self.num_inference_steps, self.latent_shape = int(num_inference_steps), [int(s) for s in latent_shape]
        self.scale_factor, self.text_scale, self.amp, self.verbose = (
            float(scale_factor),
            float(text_scale),
            amp,
            verbose,
        )
        self.last_nfe = 0

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, network: EdgeControlledUNet, edges: torch.Tensor, seeds=None):  # type: ignore[override]
        if edges.ndim != 4 or edges.shape[:2] != (tokens.shape[0], 1):
            raise ValueError(
                f"edges must be [B, 1, H, W] with B = {tokens.shape[0]} prompts, got {tuple(edges.shape)}."
            )
        device = tokens.device
        seeds = list(seeds) if seeds is not None else list(range(tokens.shape[0]))
        network.eval()
        context = network.encode_context(tokens)
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=autocast_enabled(device, self.amp)):
            result = guided_sample(
                _EdgesBound(network, edges.float()), self.scheduler, classifier_free_guidance(self.text_scale, CONTEXT),
                [context], seeds, self.latent_shape[0], self.num_inference_steps, verbose=self.verbose,
                spatial_shape=self.latent_shape[1:],
            )  # fmt: skip
            decoded = self.autoencoder.decode_stage_2_outputs(result.latents / self.scale_factor)
        self.last_nfe = result.nfe
        return convert_to_tensor(decoded, track_meta=False).float().clamp(0.0, 1.0)


class RandAugmentationPhrased(Randomizable, MapTransform):
    """Append one of ``phrases`` to the prompt under ``keys`` with probability ``prob``. The text encoder here is
    trained from scratch (EMIT-Diff's is Stable Diffusion's), so training prompts carry the phrases that
    Algorithm 1 adds at sampling, and their tokens are not unseen there."""

    def __init__(
        self, keys: KeysCollection = "prompt", prob: float = 0.5, phrases: Sequence[str] = AUGMENTATION_PHRASES
    ):
        super().__init__(keys)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        self.prob, self.phrases = float(prob), tuple(phrases)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if self.phrases and self.R.random_sample() < self.prob:
                d[key] = f"{d[key]}, {self.phrases[self.R.randint(len(self.phrases))]}"
        return d


def augmented_prompts(prompt: str, count: int, seed: int, phrases: Sequence[str] = AUGMENTATION_PHRASES) -> list[str]:
    """Algorithm 1's prompts ``c_t + c_aug_i`` for ``count`` samples of one image: ``"<prompt>, <phrase>"`` with a
    phrase drawn per sample (seeded), the plain prompt when ``phrases`` is empty."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    if not phrases:
        return [prompt] * count
    rng = np.random.default_rng(seed)
    return [f"{prompt}, {phrases[i]}" for i in rng.integers(0, len(phrases), count)]


class GreyscaleHead(nn.Module):
    """EMIT-Diff's cross-channel average block: a decoder with RGB output ``[B, 3, H, W]`` made grey
    ``[B, 1, H, W]`` without retraining (S2:L102). Wraps any module whose output has channels in dimension 1."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.decoder(*args, **kwargs).mean(dim=1, keepdim=True)


def task_entries(
    datalist: str | os.PathLike, split: str, task: str | None, keys: Sequence[str] = ("image", "label")
) -> list[dict]:
    """The entries of one ``task`` (all with ``task`` None) in a datalist split, files under ``keys`` resolved.

    Raises:
        ValueError: the split has no entry of the task (the message lists the tasks it has).
    """
    entries = load_datalist(datalist, split, list(keys))
    chosen = [entry for entry in entries if task is None or entry.get("task") == task]
    if not chosen:
        found = sorted({str(entry.get("task")) for entry in entries})
        raise ValueError(f"split '{split}' of '{datalist}' has no entries of task '{task}'; it has tasks {found}.")
    return chosen


def _conditions(entries: Sequence[Mapping], load: Callable[[Mapping], Mapping], edge_settings: Mapping) -> tuple:
    """Images ``[N, 1, H, W]`` and conditioning edges ``[N, 1, H, W]`` of ``entries`` (``load`` gives each entry's
    ``image`` and, for mask edges, ``label``, as ``[1, H, W]``)."""
    images, edges = [], []
    for entry in entries:
        item = load(dict(entry))
        image = torch.as_tensor(item["image"]).float()
        mask = torch.as_tensor(item["label"])[0].numpy() if "label" in item else None
        images.append(image)
        edges.append(edge_map(image[0].numpy(), mask, **edge_settings))
    return torch.stack(images), torch.stack(edges)


def _sample(sampler, network, tokenizer, prompts, edges, seeds, batch_size, device) -> torch.Tensor:
    """Generated images ``[N, 1, H, W]`` (CPU) of ``prompts`` and ``edges``, ``batch_size`` at a time."""
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        tokens = tokenizer(list(prompts[start:stop])).to(device)
        images.append(sampler(tokens, network, edges[start:stop].to(device), seeds=seeds[start:stop]).cpu())
        logger.info(f"generated {min(stop, len(prompts))} of {len(prompts)} images")
    return torch.cat(images)


def generate_augmentations(
    sampler: EdgeLatentSampler,
    network: EdgeControlledUNet,
    tokenizer,
    entries: Sequence[Mapping],
    load: Callable[[Mapping], Mapping],
    output_dir: str | os.PathLike,
    samples_per_image: int = 10,
    num_samples: int | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    edge_settings: Mapping | None = None,
    phrases: Sequence[str] = AUGMENTATION_PHRASES,
    spacing: Sequence[float] | None = None,
) -> list[Path]:
    """EMIT-Diff's Algorithm 1: ``samples_per_image`` samples of each source entry, from its conditioning edges
    (``edge_settings`` of :func:`~medgen_common.edges.edge_map`, default the union of Canny edges and the mask
    boundary) and its ``"prompt"`` plus an augmentation phrase (:func:`augmented_prompts`).

    Sample ``k`` (seed ``seed + k``) comes from source ``k // samples_per_image``; ``num_samples`` (default all)
    caps the total. Writes ``<subject>_aug<j>_image.nii.gz`` (``H x W x 1``, on the source file's affine unless
    ``spacing`` is given), ``samples.png`` (sources, their
    edges, then the first sample of each) and ``datalist_synthetic.json``, whose ``training`` entries keep the
    source's ``label`` (the mask the image was generated to fit), ``task`` and ``subject``, with ``source_image``,
    ``prompt`` and ``seed``. Returns the image paths.
    """
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}.")
    total = len(entries) * samples_per_image if num_samples is None else int(num_samples)
    sources = [k // samples_per_image for k in range(total)]
    if not entries or (sources and sources[-1] >= len(entries)):
        raise ValueError(
            f"{total} samples at {samples_per_image} per image need {sources[-1] + 1 if sources else 1} source images, {len(entries)} given."
        )
    settings = dict(edge_settings or {"mode": "union"})
    used = sorted(set(sources))
    source_images, source_edges = _conditions([entries[i] for i in used], load, settings)
    position = {index: row for row, index in enumerate(used)}
    prompts, seeds = [], []
    for k, index in enumerate(sources):
        prompts.append(augmented_prompts(entries[index]["prompt"], 1, seed + k, phrases)[0])
        seeds.append(seed + k)
    edges = source_edges[[position[i] for i in sources]]
    images = _sample(sampler, network, tokenizer, prompts, edges, seeds, batch_size, device)
    output_dir = Path(output_dir)
    paths, datalist = [], []
    for k, (index, image) in enumerate(zip(sources, images)):
        entry = entries[index]
        name = f"{entry.get('subject', f'source{index:04d}')}_aug{k % samples_per_image:02d}_image.nii.gz"
        source = str(entry["image"])  # on the source's grid, so the sample overlays its label in 3D Slicer
        affine = nib.load(source).affine if spacing is None and os.path.isfile(source) else None
        paths.append(save_nifti(image.numpy(), output_dir / name, affine=affine, spacing=spacing))
        datalist.append({
            "image": name, "label": entry.get("label"), "source_image": entry["image"], "prompt": prompts[k],
            "seed": seeds[k], **{key: entry[key] for key in ("task", "subject") if key in entry},
        })  # fmt: skip
    first = [sources.index(i) for i in used][:8]
    preview = [*source_images[: len(first)], *source_edges[: len(first)], *images[first]]
    save_png_grid(list(preview), output_dir / "samples.png", value_range=(0.0, 1.0), rotate=False, ncols=len(first))
    write_json({"training": datalist}, output_dir / "datalist_synthetic.json")
    return paths


def edge_fidelity_report(
    sampler: EdgeLatentSampler,
    network: EdgeControlledUNet,
    tokenizer,
    entries: Sequence[Mapping],
    load: Callable[[Mapping], Mapping],
    output_dir: str | os.PathLike,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    edge_settings: Mapping | None = None,
    tolerance_px: float = 2.0,
) -> dict:
    """Does the generator follow its edges? One sample per entry from its conditioning edges and plain prompt.

    - ``edge_f1``: F1 within ``tolerance_px`` between the Canny edges of each generated image (same method and
      sigma as the condition's image edges) and its conditioning edges, mean ± SD;
    - ``edge_f1_shuffled``: the same generated images against another entry's conditioning edges (a fixed
      derangement), the level of edges that are not followed (NaN, with a note, for a single entry);
    - ``paired_fidelity``: MAE, MSE, RMSE and MS-SSIM of each generated image to its source image (EMIT-Diff
      Table 1; :func:`~medgen_common.metrics.paired_fidelity`).

    Writes ``evaluation.json`` and ``edges.png`` (rows: sources, conditioning edges, generated images, their edges)
    under ``output_dir``; returns the report.
    """
    if not entries:
        raise ValueError("the edge-fidelity check needs at least one entry.")
    settings = dict(edge_settings or {"mode": "union"})
    sources, conditions = _conditions(entries, load, settings)
    seeds = [seed + k for k in range(len(entries))]
    generated = _sample(
        sampler, network, tokenizer, [e["prompt"] for e in entries], conditions, seeds, batch_size, device
    )
    method, sigma = settings.get("method", "canny"), settings.get("sigma", 1.0)
    found = [image_edges(image[0].numpy(), method, sigma) for image in generated]
    followed = [edge_f1(edges, condition[0].numpy(), tolerance_px)["f1"] for edges, condition in zip(found, conditions)]
    shuffled = []  # the control needs another image's edges
    if len(entries) > 1:
        derangement = np.roll(np.arange(len(entries)), 1 + np.random.default_rng(seed).integers(len(entries) - 1))
        shuffled = [
            edge_f1(edges, conditions[j][0].numpy(), tolerance_px)["f1"] for edges, j in zip(found, derangement)
        ]

    def summary(values: Sequence[float]) -> dict:
        if not values:
            return {"mean": float("nan"), "sd": float("nan"), "per_image": [], "note": "needs at least 2 images"}
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return {"mean": float(np.mean(values)), "sd": sd, "per_image": [float(v) for v in values]}

    report = {
        "num_images": len(entries),
        "edge_settings": settings,
        "tolerance_px": float(tolerance_px),
        "edge_f1": summary(followed),
        "edge_f1_shuffled": summary(shuffled),
        "paired_fidelity": paired_fidelity(generated, sources.clamp(0.0, 1.0), data_range=1.0),
        "tasks": sorted({str(e.get("task", "")) for e in entries}),
    }
    output_dir = Path(output_dir)
    shown = min(8, len(entries))
    rows = [
        *sources[:shown],
        *conditions[:shown],
        *generated[:shown],
        *(torch.from_numpy(e[None].astype(np.float32)) for e in found[:shown]),
    ]
    save_png_grid(rows, output_dir / "edges.png", value_range=(0.0, 1.0), rotate=False, ncols=shown)
    write_json(report, output_dir / "evaluation.json")
    logger.info(f"edge F1 {report['edge_f1']['mean']:.3f} (shuffled {report['edge_f1_shuffled']['mean']:.3f})")
    return report
