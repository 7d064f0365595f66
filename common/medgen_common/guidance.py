"""Classifier-free guidance for diffusion models whose conditions are images concatenated to the noisy latent along
channels (InstructPix2Pix style): the network input is ``cat([z_t, condition_1, ..., condition_n], dim=1)`` and a
dropped (null) condition is all zeros, in training (:func:`drop_conditions`) and in sampling alike.

- :class:`ConcatGuidance`: a guidance rule, i.e. which conditions each branch keeps and the weight of each branch's
  prediction; every branch goes through the network in **one** batched call per step.
- :func:`classifier_free_guidance`: one condition, ``e(z, ∅) + s (e(z, c) − e(z, ∅))`` (Ho & Salimans 2022).
- :func:`double_guidance`: two conditions, the CSG paper's Eq. 1 (semantic mask ``c_S``, then context image ``c_C``).
- :func:`guided_sample`: the denoising loop over a MONAI DDPM/DDIM scheduler, seeded per sample.
- :func:`drop_conditions`: the InstructPix2Pix dropout of two conditions for training.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.utils import optional_import
from torch import nn

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "NULL_IMAGE_CONDITION_VALUE",
    "ConcatGuidance",
    "classifier_free_guidance",
    "double_guidance",
    "GuidedSamples",
    "guided_sample",
    "drop_conditions",
]

# Value of a dropped image condition: InstructPix2Pix's null image latent is zeros. Not engines.NULL_CONDITION_VALUE
# (-1, MONAI's cross-attention default for vector conditions): a zero latent is the natural "no image" for concat.
NULL_IMAGE_CONDITION_VALUE = 0.0


@dataclass(frozen=True)
class ConcatGuidance:
    """Guided prediction ``sum_k weights[k] * e(z_t, branch_k)``, where branch ``k`` keeps condition ``j`` when
    ``branches[k][j]`` is True and replaces it by zeros otherwise. Branches of weight 0 are not evaluated.

    Args:
        branches: one tuple of booleans per branch, one boolean per condition (in channel order).
        weights: one weight per branch; guidance rules written as ``e_null + s (e_cond - e_null)`` sum to 1.
    """

    branches: tuple[tuple[bool, ...], ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.branches) != len(self.weights) or not self.branches:
            raise ValueError(
                f"need one weight per branch, got {len(self.branches)} branches and {len(self.weights)} weights."
            )
        if len({len(branch) for branch in self.branches}) != 1:
            raise ValueError(f"every branch must name the same number of conditions, got {self.branches}.")
        if not self.branches[0]:
            raise ValueError("a guidance rule needs at least one condition.")
        if all(weight == 0 for weight in self.weights):
            raise ValueError("at least one guidance branch needs a non-zero weight.")

    @property
    def num_conditions(self) -> int:
        return len(self.branches[0])

    @property
    def active_branches(self) -> list[int]:
        """Indices of the branches the network evaluates (non-zero weight)."""
        return [index for index, weight in enumerate(self.weights) if weight != 0]

    def network_input(self, latents: torch.Tensor, conditions: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack the active branches along the batch: ``[K * B, C_z + sum C_j, *spatial]`` for ``latents``
        ``[B, C_z, *spatial]`` and ``conditions[j]`` ``[B, C_j, *spatial]`` (branch-major: rows ``k*B .. k*B+B-1``
        are branch ``active_branches[k]``)."""
        if len(conditions) != self.num_conditions:
            raise ValueError(f"this guidance rule takes {self.num_conditions} conditions, got {len(conditions)}.")
        for index, condition in enumerate(conditions):
            if condition.shape[0] != latents.shape[0] or condition.shape[2:] != latents.shape[2:]:
                raise ValueError(
                    f"condition {index} must be [B, C, *spatial] = [{latents.shape[0]}, C, "
                    f"{', '.join(map(str, latents.shape[2:]))}] like the latents, got {tuple(condition.shape)}."
                )
        rows = []
        for index in self.active_branches:
            kept = [
                condition if keep else torch.full_like(condition, NULL_IMAGE_CONDITION_VALUE)
                for condition, keep in zip(conditions, self.branches[index])
            ]
            rows.append(torch.cat([latents, *kept], dim=1))
        return torch.cat(rows, dim=0)

    def __call__(
        self,
        network: nn.Module,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        conditions: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Guided network prediction ``[B, C_out, *spatial]`` at one ``timestep`` from a single network call on the
        ``[K * B, ...]`` batch of :meth:`network_input`; ``network(x, timesteps)`` as ``DiffusionModelUNet``."""
        model_input = self.network_input(latents, conditions)
        timesteps = torch.full((model_input.shape[0],), int(timestep), device=latents.device, dtype=torch.long)
        output = network(model_input, timesteps)
        if output.shape[0] != model_input.shape[0]:
            raise ValueError(
                f"the network returned batch {output.shape[0]} for an input batch of {model_input.shape[0]}."
            )
        predictions = output.chunk(len(self.active_branches), dim=0)
        return sum(self.weights[index] * prediction for index, prediction in zip(self.active_branches, predictions))


def classifier_free_guidance(guidance_scale: float = 1.0) -> ConcatGuidance:
    """One condition: ``e(z, ∅) + s (e(z, c) − e(z, ∅)) = (1 − s) e(z, ∅) + s e(z, c)``; ``s = 1`` is plain
    conditional sampling (one branch), ``s = 0`` unconditional."""
    s = float(guidance_scale)
    return ConcatGuidance(branches=((False,), (True,)), weights=(1.0 - s, s))


def double_guidance(semantic_scale: float = 1.5, context_scale: float = 2.5) -> ConcatGuidance:
    """Two conditions ``(c_S, c_C)``, in this channel order, guided as CSG Eq. 1 (InstructPix2Pix's two-scale rule,
    ``c_S`` in its image slot and ``c_C`` in its text slot)::

        e~ = e(z, ∅, ∅) + s_S (e(z, c_S, ∅) − e(z, ∅, ∅)) + s_C (e(z, c_S, c_C) − e(z, c_S, ∅))
           = (1 − s_S) e(z, ∅, ∅) + (s_S − s_C) e(z, c_S, ∅) + s_C e(z, c_S, c_C)

    The paper's scales are ``s_S = 1.5``, ``s_C = 2.5``. ``e(z, ∅, c_C)`` is trained (by dropout) but never used.
    """
    s_semantic, s_context = float(semantic_scale), float(context_scale)
    return ConcatGuidance(
        branches=((False, False), (True, False), (True, True)),
        weights=(1.0 - s_semantic, s_semantic - s_context, s_context),  # Eq. 1 expanded
    )


@dataclass
class GuidedSamples:
    """Output of :func:`guided_sample`.

    Attributes:
        latents: denoised latents ``[B, C, *spatial]``.
        nfe: network forward calls, one per step: a call evaluates every sample and every guidance branch at once
            (a batched 3-branch call counts as 1), so it is also the number of calls each sample waits for.
        branch_evaluations: ``nfe`` times the branches per call, i.e. single-branch network evaluations per sample
            (the compute that classifier-free guidance multiplies: 3 per step for Eq. 1).
    """

    latents: torch.Tensor
    nfe: int
    branch_evaluations: int


@torch.no_grad()
def guided_sample(
    network: nn.Module,
    scheduler,
    guidance: ConcatGuidance,
    conditions: Sequence[torch.Tensor],
    seeds: Sequence[int],
    latent_channels: int,
    num_inference_steps: int | None = None,
    verbose: bool = False,
) -> GuidedSamples:
    """Denoise seeded Gaussian noise with ``guidance`` at every step of a MONAI scheduler.

    Sample ``i`` starts from ``torch.randn`` of a generator seeded with ``seeds[i]``, and that generator also draws
    the sample's step noise (DDPM, DDIM with eta > 0): a sample depends on its seed and conditions only, not on the
    batch it is drawn in. Schedulers whose ``step`` takes no generator (PNDM) are stepped on the whole batch.

    Args:
        network: noise predictor ``network(x, timesteps)``, e.g. ``DiffusionModelUNet`` with
            ``in_channels = latent_channels + sum C_j``.
        scheduler: MONAI ``DDPMScheduler``/``DDIMScheduler`` (trained on epsilon, v or sample prediction alike).
        guidance: e.g. ``double_guidance(1.5, 2.5)``.
        conditions: ``[B, C_j, *spatial]`` each, in the channel order the network was trained with.
        seeds: one seed per sample (``B`` of them).
        latent_channels: channels of the denoised latent.
        num_inference_steps: calls ``scheduler.set_timesteps`` when given; else the scheduler's timesteps are used.
        verbose: show a progress bar (tqdm) over the steps.
    """
    if len(conditions) != guidance.num_conditions:
        raise ValueError(f"this guidance rule takes {guidance.num_conditions} conditions, got {len(conditions)}.")
    if len(seeds) != conditions[0].shape[0]:
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for a batch of {conditions[0].shape[0]}.")
    device = conditions[0].device
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps=int(num_inference_steps), device=device)
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    shape = (int(latent_channels), *conditions[0].shape[2:])
    latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    per_sample_step = "generator" in inspect.signature(scheduler.step).parameters
    timesteps = tqdm(scheduler.timesteps, desc="sampling", leave=False) if verbose and has_tqdm else scheduler.timesteps
    network.eval()
    nfe = 0
    for t in timesteps:
        prediction = guidance(network, latents, t, conditions)
        nfe += 1
        if per_sample_step:
            latents = torch.cat(
                [
                    scheduler.step(prediction[i : i + 1], t, latents[i : i + 1], generator=generators[i])[0]
                    for i in range(len(generators))
                ]
            )
        else:
            latents = scheduler.step(prediction, t, latents)[0]
    return GuidedSamples(latents=latents, nfe=nfe, branch_evaluations=nfe * len(guidance.active_branches))


def drop_conditions(
    semantic: torch.Tensor,
    context: torch.Tensor,
    p_context_only_dropped: float = 0.05,
    p_semantic_only_dropped: float = 0.05,
    p_both_dropped: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace conditions by zeros per sample for classifier-free guidance training (CSG §2.1.2, InstructPix2Pix).

    One ``r ~ U(0, 1)`` per sample: ``r < p_c`` drops only ``context``; ``p_c <= r < p_c + p_b`` drops both;
    ``p_c + p_b <= r < p_c + p_b + p_s`` drops only ``semantic``; otherwise nothing. With the defaults each condition
    is dropped for 10 % of samples and 85 % keep both (the paper's "5 % ... and both for 5 %").

    Args:
        semantic, context: ``[B, C_S, *spatial]`` and ``[B, C_C, *spatial]``.
        generator: drawn from for ``r`` (on the conditions' device); the global RNG when None.

    Returns:
        the two conditions with dropped samples set to ``NULL_IMAGE_CONDITION_VALUE``.
    """
    rates = {"p_context_only_dropped": p_context_only_dropped, "p_semantic_only_dropped": p_semantic_only_dropped,
             "p_both_dropped": p_both_dropped}  # fmt: skip
    if any(not 0.0 <= p <= 1.0 for p in rates.values()) or sum(rates.values()) > 1.0:
        raise ValueError(f"dropout rates must lie in [0, 1] and sum to at most 1, got {rates}.")
    if semantic.shape[0] != context.shape[0]:
        raise ValueError(f"semantic and context need one batch size, got {semantic.shape[0]} and {context.shape[0]}.")
    r = torch.rand(semantic.shape[0], generator=generator, device=semantic.device)
    # InstructPix2Pix's interval order: context only, then both, then semantic only
    context_only_end = p_context_only_dropped
    both_end = context_only_end + p_both_dropped
    semantic_only_end = both_end + p_semantic_only_dropped
    context_only = r < context_only_end
    both = (r >= context_only_end) & (r < both_end)
    semantic_only = (r >= both_end) & (r < semantic_only_end)

    def _null(condition: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        dropped = dropped.to(condition.device).view(-1, *([1] * (condition.ndim - 1)))
        return torch.where(dropped, torch.full_like(condition, NULL_IMAGE_CONDITION_VALUE), condition)

    return _null(semantic, semantic_only | both), _null(context, context_only | both)
