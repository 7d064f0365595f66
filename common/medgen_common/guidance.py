"""Classifier-free guidance over one or more conditions, written once for every bundle that guides.

A condition is either an image concatenated to the noisy latent along channels (``"concat"``, InstructPix2Pix style;
dropped = all zeros) or a cross-attention context ``[B, L, d]`` (``"context"``, MONAI's convention; dropped = filled
with -1, ``NULL_CONTEXT_VALUE``, as ``DiffusionInferer.sample(cfg=...)`` does). The same null is used in training
(:func:`drop_conditions`, :func:`condition_dropout_masks`) and in sampling.

- :class:`GuidanceRule`: which conditions each branch keeps and the weight of each branch's prediction; every branch
  goes through the network in **one** batched call per step.
- :func:`classifier_free_guidance`: ``e(z, ∅) + s (e(z, c) − e(z, ∅))`` on the first condition (Ho & Salimans 2022).
- :func:`double_guidance`: two conditions, the CSG paper's Eq. 1 (InstructPix2Pix's two-scale rule).
- :func:`guided_sample`: the denoising loop over a MONAI DDPM/DDIM scheduler, seeded per sample.
- :func:`condition_dropout_masks` / :func:`drop_conditions`: the InstructPix2Pix dropout of two conditions.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.schedulers import RFlowScheduler
from monai.utils import optional_import
from torch import nn

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "NULL_IMAGE_CONDITION_VALUE",
    "NULL_CONTEXT_VALUE",
    "CONCAT",
    "CONTEXT",
    "GuidanceRule",
    "classifier_free_guidance",
    "double_guidance",
    "GuidedSamples",
    "guided_sample",
    "condition_dropout_masks",
    "drop_conditions",
    "null_where",
]

CONCAT, CONTEXT = "concat", "context"
# A dropped image condition is zeros (InstructPix2Pix's null image latent: the natural "no image" for concat); a
# dropped cross-attention context is -1 everywhere, the null MONAI's inferers build for ``cfg``.
NULL_IMAGE_CONDITION_VALUE = 0.0
NULL_CONTEXT_VALUE = -1.0
_NULL = {CONCAT: NULL_IMAGE_CONDITION_VALUE, CONTEXT: NULL_CONTEXT_VALUE}


@dataclass(frozen=True)
class GuidanceRule:
    """Guided prediction ``sum_k weights[k] * e(z_t, branch_k)``, where branch ``k`` keeps condition ``j`` when
    ``branches[k][j]`` is True and replaces it by its null otherwise. Branches of weight 0 are not evaluated.

    Args:
        branches: one tuple of booleans per branch, one boolean per condition.
        weights: one weight per branch; guidance rules written as ``e_null + s (e_cond - e_null)`` sum to 1.
        kinds: per condition ``"concat"`` (``[B, C_j, *spatial]``, concatenated after the latent channels in order;
            null zeros) or ``"context"`` (``[B, L, d]``, passed as ``network(..., context=)``; null -1; at most one);
            default all ``"concat"``.
    """

    branches: tuple[tuple[bool, ...], ...]
    weights: tuple[float, ...]
    kinds: tuple[str, ...] | None = None

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
        if self.kinds is None:
            object.__setattr__(self, "kinds", (CONCAT,) * len(self.branches[0]))
        if len(self.kinds) != len(self.branches[0]) or any(kind not in _NULL for kind in self.kinds):
            raise ValueError(
                f"kinds must give 'concat' or 'context' for each of the {len(self.branches[0])} conditions, got {self.kinds}."
            )
        if self.kinds.count(CONTEXT) > 1:
            raise ValueError(f"at most one condition can be the cross-attention context, got kinds {self.kinds}.")

    @property
    def num_conditions(self) -> int:
        return len(self.branches[0])

    @property
    def active_branches(self) -> list[int]:
        """Indices of the branches the network evaluates (non-zero weight)."""
        return [index for index, weight in enumerate(self.weights) if weight != 0]

    def network_input(
        self, latents: torch.Tensor, conditions: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stack the active branches along the batch (branch-major: rows ``k*B .. k*B+B-1`` are branch
        ``active_branches[k]``): the network input ``[K * B, C_z + sum C_j, *spatial]`` for ``latents``
        ``[B, C_z, *spatial]`` and the concat conditions, and the context ``[K * B, L, d]`` (None without one)."""
        if len(conditions) != self.num_conditions:
            raise ValueError(f"this guidance rule takes {self.num_conditions} conditions, got {len(conditions)}.")
        for index, (condition, kind) in enumerate(zip(conditions, self.kinds)):
            if condition.shape[0] != latents.shape[0]:
                raise ValueError(f"condition {index} has batch {condition.shape[0]}, the latents {latents.shape[0]}.")
            if kind == CONCAT and condition.shape[2:] != latents.shape[2:]:
                raise ValueError(
                    f"condition {index} must be [B, C, *spatial] = [{latents.shape[0]}, C, "
                    f"{', '.join(map(str, latents.shape[2:]))}] like the latents, got {tuple(condition.shape)}."
                )
            if kind == CONTEXT and condition.ndim != 3:
                raise ValueError(f"the context condition must be [B, L, d], got {tuple(condition.shape)}.")
        inputs, contexts = [], []
        for index in self.active_branches:
            kept = [
                condition if keep else torch.full_like(condition, _NULL[kind])
                for condition, keep, kind in zip(conditions, self.branches[index], self.kinds)
            ]
            inputs.append(torch.cat([latents, *[c for c, kind in zip(kept, self.kinds) if kind == CONCAT]], dim=1))
            contexts += [c for c, kind in zip(kept, self.kinds) if kind == CONTEXT]
        return torch.cat(inputs, dim=0), (torch.cat(contexts, dim=0) if contexts else None)

    def __call__(
        self,
        network: nn.Module,
        latents: torch.Tensor,
        timestep: int | torch.Tensor,
        conditions: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Guided network prediction ``[B, C_out, *spatial]`` at one ``timestep`` from a single network call on the
        ``[K * B, ...]`` batch of :meth:`network_input`: ``network(x, timesteps)``, or ``network(x, timesteps,
        context=...)`` with a context condition, as ``DiffusionModelUNet``."""
        model_input, context = self.network_input(latents, conditions)
        timesteps = torch.full((model_input.shape[0],), int(timestep), device=latents.device, dtype=torch.long)
        output = (
            network(model_input, timesteps) if context is None else network(model_input, timesteps, context=context)
        )
        if output.shape[0] != model_input.shape[0]:
            raise ValueError(
                f"the network returned batch {output.shape[0]} for an input batch of {model_input.shape[0]}."
            )
        predictions = output.chunk(len(self.active_branches), dim=0)
        return sum(self.weights[index] * prediction for index, prediction in zip(self.active_branches, predictions))


def classifier_free_guidance(guidance_scale: float = 1.0, kind: str = CONCAT) -> GuidanceRule:
    """One condition of ``kind``: ``e(z, ∅) + s (e(z, c) − e(z, ∅)) = (1 − s) e(z, ∅) + s e(z, c)``; ``s = 1`` is
    plain conditional sampling (one branch), ``s = 0`` unconditional."""
    s = float(guidance_scale)
    return GuidanceRule(branches=((False,), (True,)), weights=(1.0 - s, s), kinds=(kind,))


def double_guidance(
    semantic_scale: float = 1.5, context_scale: float = 2.5, kinds: tuple[str, str] = (CONCAT, CONCAT)
) -> GuidanceRule:
    """Two conditions ``(c_S, c_C)``, in this channel order, guided as CSG Eq. 1 (InstructPix2Pix's two-scale rule,
    ``c_S`` in its image slot and ``c_C`` in its text slot)::

        e~ = e(z, ∅, ∅) + s_S (e(z, c_S, ∅) − e(z, ∅, ∅)) + s_C (e(z, c_S, c_C) − e(z, c_S, ∅))
           = (1 − s_S) e(z, ∅, ∅) + (s_S − s_C) e(z, c_S, ∅) + s_C e(z, c_S, c_C)

    The paper's scales are ``s_S = 1.5``, ``s_C = 2.5``. ``e(z, ∅, c_C)`` is trained (by dropout) but never used.
    With ``s_C = 0`` it is plain guidance on ``c_S`` with ``c_C`` always null (two branches).
    """
    s_semantic, s_context = float(semantic_scale), float(context_scale)
    return GuidanceRule(
        branches=((False, False), (True, False), (True, True)),
        weights=(1.0 - s_semantic, s_semantic - s_context, s_context),  # Eq. 1 expanded
        kinds=tuple(kinds),
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
    guidance: GuidanceRule,
    conditions: Sequence[torch.Tensor],
    seeds: Sequence[int],
    latent_channels: int,
    num_inference_steps: int | None = None,
    verbose: bool = False,
    spatial_shape: Sequence[int] | None = None,
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
        conditions: in the rule's order: ``[B, C_j, *spatial]`` (concat, in the channel order the network was
            trained with) or ``[B, L, d]`` (context).
        seeds: one seed per sample (``B`` of them).
        latent_channels: channels of the denoised latent.
        num_inference_steps: calls ``scheduler.set_timesteps`` when given; else the scheduler's timesteps are used.
        verbose: show a progress bar (tqdm) over the steps.
        spatial_shape: of the latent; default that of the first concat condition.
    """
    if len(conditions) != guidance.num_conditions:
        raise ValueError(f"this guidance rule takes {guidance.num_conditions} conditions, got {len(conditions)}.")
    if len(seeds) != conditions[0].shape[0]:
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for a batch of {conditions[0].shape[0]}.")
    device = conditions[0].device
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps=int(num_inference_steps), device=device)
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    if spatial_shape is None:
        concat = [c for c, kind in zip(conditions, guidance.kinds) if kind == CONCAT]
        if not concat:
            raise ValueError("without a concat condition the latent spatial_shape must be given.")
        spatial_shape = concat[0].shape[2:]
    shape = (int(latent_channels), *spatial_shape)
    latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    batch_step = getattr(scheduler, "per_sample_generators", False)  # stateful: steps the batch, one generator each
    per_sample_step = not batch_step and "generator" in inspect.signature(scheduler.step).parameters
    timesteps = tqdm(scheduler.timesteps, desc="sampling", leave=False) if verbose and has_tqdm else scheduler.timesteps
    network.eval()
    nfe = 0
    following = [*scheduler.timesteps[1:].tolist(), 0]
    for t, next_t in zip(timesteps, following):
        prediction = guidance(network, latents, t, conditions)
        nfe += 1
        if isinstance(scheduler, RFlowScheduler):  # integrates velocity from t to the next timestep
            latents = scheduler.step(prediction, t, latents, next_t)[0]
        elif per_sample_step:
            latents = torch.cat(
                [
                    scheduler.step(prediction[i : i + 1], t, latents[i : i + 1], generator=generators[i])[0]
                    for i in range(len(generators))
                ]
            )
        elif batch_step:
            latents = scheduler.step(prediction, t, latents, generator=generators)[0]
        else:
            latents = scheduler.step(prediction, t, latents)[0]
    return GuidedSamples(latents=latents, nfe=nfe, branch_evaluations=nfe * len(guidance.active_branches))


def condition_dropout_masks(
    batch_size: int,
    p_second_only_dropped: float = 0.05,
    p_first_only_dropped: float = 0.05,
    p_both_dropped: float = 0.05,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples drop each of two conditions, for classifier-free guidance training (InstructPix2Pix's rule).

    One ``r ~ U(0, 1)`` per sample: ``r < p_2`` drops only the second; ``p_2 <= r < p_2 + p_b`` drops both;
    ``p_2 + p_b <= r < p_2 + p_b + p_1`` drops only the first; otherwise nothing.

    Returns:
        boolean ``[B]`` masks (dropped first, dropped second).
    """
    rates = {"p_second_only_dropped": p_second_only_dropped, "p_first_only_dropped": p_first_only_dropped,
             "p_both_dropped": p_both_dropped}  # fmt: skip
    if any(not 0.0 <= p <= 1.0 for p in rates.values()) or sum(rates.values()) > 1.0:
        raise ValueError(f"dropout rates must lie in [0, 1] and sum to at most 1, got {rates}.")
    r = torch.rand(batch_size, generator=generator, device=device)
    second_only_end = p_second_only_dropped  # InstructPix2Pix's interval order: second only, both, first only
    both_end = second_only_end + p_both_dropped
    first_only_end = both_end + p_first_only_dropped
    both = (r >= second_only_end) & (r < both_end)
    return both | ((r >= both_end) & (r < first_only_end)), both | (r < second_only_end)


def drop_conditions(
    semantic: torch.Tensor,
    context: torch.Tensor,
    p_context_only_dropped: float = 0.05,
    p_semantic_only_dropped: float = 0.05,
    p_both_dropped: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace two concat conditions by zeros per sample (CSG §2.1.2, :func:`condition_dropout_masks`): with the
    defaults each is dropped for 10 % of samples and 85 % keep both (the paper's "5 % ... and both for 5 %").

    Args:
        semantic, context: ``[B, C_S, *spatial]`` and ``[B, C_C, *spatial]``.
        generator: drawn from (on the conditions' device); the global RNG when None.

    Returns:
        the two conditions with dropped samples set to ``NULL_IMAGE_CONDITION_VALUE``.
    """
    if semantic.shape[0] != context.shape[0]:
        raise ValueError(f"semantic and context need one batch size, got {semantic.shape[0]} and {context.shape[0]}.")
    semantic_dropped, context_dropped = condition_dropout_masks(
        semantic.shape[0], p_context_only_dropped, p_semantic_only_dropped, p_both_dropped, generator, semantic.device
    )
    return null_where(semantic, semantic_dropped, CONCAT), null_where(context, context_dropped, CONCAT)


def null_where(condition: torch.Tensor, dropped: torch.Tensor, kind: str = CONCAT) -> torch.Tensor:
    """``condition`` ``[B, ...]`` with the samples where ``dropped`` (``[B]`` bool) set to the null of ``kind``."""
    dropped = dropped.to(condition.device).view(-1, *([1] * (condition.ndim - 1)))
    return torch.where(dropped, torch.full_like(condition, _NULL[kind]), condition)
