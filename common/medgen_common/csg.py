"""Context-semantic guided (CSG) latent diffusion for ultrasound (msk_csg bundle, paper §2.1.2).

The denoiser's input is the channel concatenation ``[noisy image latent, semantic condition c_S, context latent c_C]``
(InstructPix2Pix style): ``c_S`` is the one-hot mask average-pooled to the latent grid, ``c_C`` the autoencoder latent
of the context image. A dropped condition is zeros, in training (:func:`~medgen_common.guidance.drop_conditions`) and
in sampling (:func:`~medgen_common.guidance.guided_sample` with Eq. 1, :func:`~medgen_common.guidance.double_guidance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.engines import DiffusionPrepareBatch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor
from torch import nn

from .guidance import double_guidance, drop_conditions, guided_sample
from .runtime import autocast_dtype, autocast_enabled
from .sampling import named_batch

__all__ = [
    "semantic_condition",
    "cross_device_pairs",
    "write_generated_masks",
    "inference_pairs",
    "CsgPrepareBatch",
    "CsgInferencePrepareBatch",
    "CsgSampler",
]


def cross_device_pairs(entries: Sequence[dict], seed: int = 0, device_key: str = "device", subject_key: str = "subject") -> list[dict]:
    """Give every entry (``image``, ``label``) the ``image`` of another entry as its ``context`` (and
    ``context_device`` / ``context_subject`` when known): from another device when the split has several (test pairs
    whose mask and texture come from different scanners, so that following the context is measurable), else from
    another subject, else any other image. Drawn with ``numpy.random.default_rng(seed)``.

    Raises:
        ValueError: fewer than two entries.
    """
    if len(entries) < 2:
        raise ValueError(f"context pairs need at least two entries, got {len(entries)}.")
    rng = np.random.default_rng(seed)
    pairs = []
    for index, entry in enumerate(entries):
        others = [other for position, other in enumerate(entries) if position != index]
        for key in (device_key, subject_key):
            if key in entry and any(other.get(key) != entry[key] for other in others):
                others = [other for other in others if other.get(key) != entry[key]]
                break
        context = others[int(rng.integers(len(others)))]
        pair = {**entry, "context": context["image"]}
        for key in (device_key, subject_key):
            if key in context:
                pair[f"context_{key}"] = context[key]
        pairs.append(pair)
    return pairs


def write_generated_masks(
    mask_generator: nn.Module,
    checkpoint: str,
    num_masks: int,
    output_dir: str,
    finding_classes: Sequence[int],
    min_pixels: int = 1,
    min_component_pixels: int = 0,
    truncation_psi: float = 1.0,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
) -> list[str]:
    """Load the mask generator's weights from ``checkpoint``, draw ``num_masks`` masks that pass the paper's finding
    filter
    (:func:`~medgen_common.stylegan.sample_filtered_masks`) and write them as ``mask_NNNNNN.nii.gz`` class-index
    maps ``H x W x 1`` (uint8) under ``output_dir``; returns their paths."""
    from .stylegan import sample_filtered_masks
    from .writers import save_nifti

    mask_generator.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    masks = sample_filtered_masks(
        mask_generator, num_masks, list(finding_classes), min_pixels=min_pixels,
        min_component_pixels=min_component_pixels, truncation_psi=truncation_psi, seed=seed,
    )  # fmt: skip
    paths = []
    for index, mask in enumerate(masks):
        path = Path(output_dir) / f"mask_{index:06d}.nii.gz"
        save_nifti(mask[0].cpu().numpy().astype(np.uint8)[..., None], path, spacing=spacing, channel_first=False)
        paths.append(str(path))
    return paths


def inference_pairs(
    datalist_path: str, split: str, num_samples: int, seed: int = 0, mask_paths: Sequence[str] | None = None
) -> list[dict]:
    """Sampling items ``{"label", "context", "context_device", "seed", ...}``: the masks of a datalist split (or
    ``mask_paths``, e.g. from :func:`write_generated_masks`), each with the image of another device's entry as its
    context (:func:`cross_device_pairs`), cycled to ``num_samples``; sample ``i`` has seed ``seed + i``."""
    from .datalist import load_datalist

    pairs = cross_device_pairs(load_datalist(datalist_path, split, ["image", "label"]), seed)
    items = []
    for index in range(int(num_samples)):
        item = dict(pairs[index % len(pairs)])
        if mask_paths is not None:
            item = {"label": mask_paths[index % len(mask_paths)], "context": item["context"], "context_device": item["context_device"]}
        items.append({**item, "seed": int(seed) + index})
    return items


def semantic_condition(label: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """One-hot mask ``[B, C, H, W]`` average-pooled to ``[B, C, *latent_shape]``: the fraction of each class in every
    latent cell (the paper's c_S at latent resolution)."""
    if label.ndim != 4:
        raise ValueError(f"the semantic mask must be one-hot [B, C, H, W], got shape {tuple(label.shape)}.")
    factors = [size // latent for size, latent in zip(label.shape[2:], latent_shape)]
    if any(f < 1 or f * latent != size for f, latent, size in zip(factors, latent_shape, label.shape[2:])):
        raise ValueError(f"mask size {tuple(label.shape[2:])} is not a multiple of the latent size {tuple(latent_shape)}.")
    return F.avg_pool2d(label.float(), kernel_size=factors)


class CsgPrepareBatch(DiffusionPrepareBatch):
    """Prepare a CSG training batch for ``SupervisedTrainer`` + ``DiffusionInferer`` (``mode="concat"``).

    Batch keys: ``image`` and ``context`` ``[B, 1, H, W]`` in [0, 1], ``label`` one-hot ``[B, C, H, W]``. Both images
    are encoded with the frozen autoencoder (a posterior sample, times ``scale_factor``); the conditions are dropped
    per sample to zeros with the given rates (paper: 5 % context only, 5 % semantic only, 5 % both).

    Returns ``(latents, noise, (), {"noise", "timesteps", "condition", "mode"})`` (target = noise).
    """

    def __init__(
        self,
        num_train_timesteps: int,
        autoencoder: nn.Module,
        scale_factor: float = 1.0,
        p_context_only_dropped: float = 0.05,
        p_semantic_only_dropped: float = 0.05,
        p_both_dropped: float = 0.05,
    ):
        super().__init__(num_train_timesteps=num_train_timesteps)
        self.autoencoder, self.scale_factor = autoencoder, float(scale_factor)
        self.dropout = {
            "p_context_only_dropped": p_context_only_dropped,
            "p_semantic_only_dropped": p_semantic_only_dropped,
            "p_both_dropped": p_both_dropped,
        }

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.autoencoder.eval()
        latents = self.autoencoder.encode_stage_2_inputs(images.float()) * self.scale_factor
        return convert_to_tensor(latents, track_meta=False)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        def get(key: str) -> torch.Tensor:
            return convert_to_tensor(batchdata[key], track_meta=False).to(device, non_blocking=non_blocking).float()

        latents, context = self.encode(get("image")), self.encode(get("context"))
        semantic = semantic_condition(get("label"), latents.shape[2:])
        semantic, context = drop_conditions(semantic, context, **self.dropout)
        noise = self.get_noise(latents)
        timesteps = self.get_timesteps(latents)
        condition = torch.cat([semantic, context], dim=1)
        return latents, noise, (), {"noise": noise, "timesteps": timesteps, "condition": condition, "mode": "concat"}


class CsgInferencePrepareBatch:
    """``(label, None, (), {"context", "seeds"})`` from a batch of :func:`inference_pairs` items (``label`` one-hot
    ``[B, C, H, W]``, ``context`` ``[B, 1, H, W]``, ``seed`` ``[B]``), for a ``SupervisedEvaluator`` with
    :class:`CsgSampler`."""

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        def get(key: str) -> torch.Tensor:
            return convert_to_tensor(batchdata[key], track_meta=False).to(device, non_blocking=non_blocking).float()

        seeds = [int(s) for s in torch.as_tensor(batchdata["seed"]).flatten().tolist()]
        return get("label"), None, (), {"context": get("context"), "seeds": seeds}


class CsgSampler(Inferer):
    """Sample images from a mask and a context image with the paper's double classifier-free guidance (Eq. 1).

    Call with the batch's ``label`` one-hot ``[B, C, H, W]``, ``context`` ``[B, 1, H, W]`` and per-sample ``seeds``;
    returns decoded images ``[B, 1, H, W]`` clipped to [0, 1], a ``MetaTensor`` named ``csg_<seed>`` with a
    ``spacing`` (mm) affine for ``SaveImaged``. The context latent is the posterior mean, so a sample depends only on
    its seed and conditions. ``last_nfe`` holds the network calls of the last batch
    (one batched call of the guidance branches per step).

    Args:
        autoencoder: the trained ``AutoencoderKL``.
        scheduler: MONAI DDPM/DDIM scheduler with the training beta schedule.
        num_inference_steps: denoising steps.
        scale_factor: latent scale used in training.
        semantic_scale, context_scale: s_S and s_C of Eq. 1 (paper 1.5, 2.5); (1, 1) is plain conditional sampling,
            (s_S, 0) semantic-only guidance.
        spacing: pixel size (mm) written in the output affine.
        amp: autocast on CUDA.
        verbose: progress bar over the steps.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scheduler,
        num_inference_steps: int,
        scale_factor: float = 1.0,
        semantic_scale: float = 1.5,
        context_scale: float = 2.5,
        spacing: Sequence[float] | None = None,
        amp: bool = True,
        verbose: bool = False,
    ):
        super().__init__()
        self.autoencoder, self.scheduler, self.num_inference_steps = autoencoder, scheduler, int(num_inference_steps)
        self.scale_factor, self.spacing, self.amp, self.verbose = float(scale_factor), spacing, amp, verbose
        self.guidance = double_guidance(semantic_scale, context_scale)
        self.last_nfe = 0

    @torch.no_grad()
    def __call__(self, label: torch.Tensor, network: nn.Module, context: torch.Tensor, seeds: Sequence[int]):  # type: ignore[override]
        self.autoencoder.eval()
        device = label.device
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=autocast_enabled(device, self.amp)):
            context_latent = self.autoencoder.encode(context.float())[0] * self.scale_factor  # posterior mean
            semantic = semantic_condition(label, context_latent.shape[2:])
            samples = guided_sample(
                network, self.scheduler, self.guidance, [semantic, context_latent], seeds,
                latent_channels=context_latent.shape[1], num_inference_steps=self.num_inference_steps, verbose=self.verbose,
            )  # fmt: skip
            images = self.autoencoder.decode_stage_2_outputs(samples.latents / self.scale_factor)
        self.last_nfe = samples.nfe
        images = convert_to_tensor(images, track_meta=False).float().clamp(0.0, 1.0)
        return named_batch(images, [f"csg_{seed:06d}" for seed in seeds], self.spacing)
