"""Classifier-free guidance over concatenated and cross-attention conditions: CSG Eq. 1, the sampler, the training dropout."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medgen_common.guidance import (
    CONCAT,
    CONTEXT,
    NULL_CONTEXT_VALUE,
    NULL_IMAGE_CONDITION_VALUE,
    GuidanceRule,
    classifier_free_guidance,
    double_guidance,
    drop_conditions,
    guided_sample,
)


class BranchRevealingNetwork(nn.Module):
    """Input ``cat([z (1 ch), c_S (1 ch), c_C (1 ch)])``; output ``1 + 10 [c_S != 0] + 100 [c_C != 0] + 0.01 z`` per
    sample, so each branch gives a different, recognisable prediction. Records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x, timesteps):
        self.calls.append(x.clone())
        z, semantic, context = x[:, :1], x[:, 1:2], x[:, 2:3]
        has_semantic = (semantic != 0).flatten(1).any(1).float().view(-1, 1, 1, 1)
        has_context = (context != 0).flatten(1).any(1).float().view(-1, 1, 1, 1)
        return 1 + 10 * has_semantic + 100 * has_context + 0.01 * z


def _inputs(batch_size=2, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents, semantic, context = (torch.randn(batch_size, 1, size, size, generator=generator) for _ in range(3))
    return latents, semantic, context


def _eq1(network, latents, semantic, context, s_semantic, s_context):
    """The paper's Eq. 1, written literally from three separate network calls."""
    zero = torch.zeros_like(semantic)
    t = torch.zeros(latents.shape[0], dtype=torch.long)
    e_null = network(torch.cat([latents, zero, zero], 1), t)
    e_semantic = network(torch.cat([latents, semantic, zero], 1), t)
    e_full = network(torch.cat([latents, semantic, context], 1), t)
    return e_null + s_semantic * (e_semantic - e_null) + s_context * (e_full - e_semantic), (e_null, e_semantic, e_full)


@pytest.mark.parametrize(
    "scales, branch", [((0.0, 0.0), "null"), ((1.0, 0.0), "semantic"), ((1.0, 1.0), "full"), ((1.5, 2.5), None)]
)
def test_double_guidance_follows_eq1(scales, branch):
    network = BranchRevealingNetwork()
    latents, semantic, context = _inputs()
    expected, (e_null, e_semantic, e_full) = _eq1(network, latents, semantic, context, *scales)
    guided = double_guidance(*scales)(network, latents, 10, [semantic, context])
    torch.testing.assert_close(guided, expected)
    if branch is not None:
        torch.testing.assert_close(guided, {"null": e_null, "semantic": e_semantic, "full": e_full}[branch])
    else:  # 1 + 1.5 * 10 + 2.5 * 100 from the mock's branch values
        torch.testing.assert_close(guided, 266 + 0.01 * latents)


def test_double_guidance_makes_one_network_call_of_three_branches():
    network = BranchRevealingNetwork()
    latents, semantic, context = _inputs(batch_size=2)
    double_guidance(1.5, 2.5)(network, latents, 10, [semantic, context])
    assert len(network.calls) == 1
    (call,) = network.calls
    assert call.shape == (6, 3, 4, 4)
    # branch-major: (∅, ∅), (c_S, ∅), (c_S, c_C), each with the same latents; ∅ is zeros as in training dropout
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        torch.testing.assert_close(call[rows, :1], latents)
    assert torch.all(call[0:2, 1:] == NULL_IMAGE_CONDITION_VALUE) and NULL_IMAGE_CONDITION_VALUE == 0.0
    torch.testing.assert_close(call[2:4, 1:2], semantic)
    assert torch.all(call[2:4, 2:] == 0)
    torch.testing.assert_close(call[4:6, 1:], torch.cat([semantic, context], 1))


def test_single_condition_guidance_extrapolates_from_the_unconditional_prediction():
    network = BranchRevealingNetwork()
    latents, semantic, _ = _inputs()
    two_channel = lambda x, t: network(torch.cat([x, torch.zeros_like(x[:, :1])], 1), t)  # noqa: E731
    guided = classifier_free_guidance(3.0)(two_channel, latents, 5, [semantic])
    torch.testing.assert_close(guided, 1 + 3.0 * 10 + 0.01 * latents)  # e0 + 3 (e1 - e0) with e0 = 1, e1 = 11
    assert network.calls[-1].shape[0] == 4
    conditional = classifier_free_guidance(1.0)(two_channel, latents, 5, [semantic])
    assert network.calls[-1].shape[0] == 2  # weight 0 on the unconditional branch: it is not evaluated
    torch.testing.assert_close(conditional, 11 + 0.01 * latents)  # scale 1 is the conditional prediction e1


def test_sampler_calls_the_network_once_per_step_and_counts_it():
    network = BranchRevealingNetwork()
    _, semantic, context = _inputs(batch_size=2)
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    result = guided_sample(
        network, scheduler, double_guidance(1.5, 2.5), [semantic, context], seeds=[0, 1], latent_channels=1,
        num_inference_steps=10, verbose=True,
    )  # fmt: skip
    assert len(network.calls) == 10 and all(call.shape[0] == 6 for call in network.calls)
    assert (result.nfe, result.branch_evaluations) == (10, 30)
    assert result.latents.shape == (2, 1, 4, 4)
    network.calls.clear()
    result = guided_sample(network, scheduler, double_guidance(1.0, 1.0), [semantic, context], [0, 1], 1, 10)
    assert len(network.calls) == 10 and all(call.shape[0] == 2 for call in network.calls)
    assert (result.nfe, result.branch_evaluations) == (10, 10)


class ConvNetwork(nn.Module):
    """A small random non-linear noise predictor ``[B, 3, H, W] -> [B, 1, H, W]`` that ignores the timestep."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x, timesteps):
        return self.layers(x)


def _sample(network, seeds, semantic, context):
    scheduler = DDPMScheduler(num_train_timesteps=50, clip_sample=False)  # stochastic steps: the seeds matter twice
    return guided_sample(network, scheduler, double_guidance(1.5, 2.5), [semantic, context], seeds, 1, 20).latents


def test_sampler_is_deterministic_per_seed_whatever_the_batch():
    network = ConvNetwork()
    _, semantic, context = _inputs(batch_size=2, size=8)
    with torch.no_grad():
        first = _sample(network, [7, 8], semantic, context)
        again = _sample(network, [7, 8], semantic, context)
        alone = _sample(network, [8], semantic[1:], context[1:])
        other = _sample(network, [7, 9], semantic, context)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(alone[0], first[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(other[0], first[0], rtol=0, atol=1e-5)
    assert (other[1] - first[1]).abs().mean() > 0.1


def test_mismatched_shapes_are_rejected():
    network = BranchRevealingNetwork()
    latents, semantic, context = _inputs(batch_size=2, size=4)
    guidance = double_guidance()
    with pytest.raises(ValueError, match="condition 1 must be"):
        guidance(network, latents, 1, [semantic, context[:, :, :3]])
    with pytest.raises(ValueError, match="condition 0 has batch 1, the latents 2"):
        guidance(network, latents, 1, [semantic[:1], context])
    with pytest.raises(ValueError, match="takes 2 conditions, got 1"):
        guidance(network, latents, 1, [semantic])
    with pytest.raises(ValueError, match="one seed per sample"):
        guided_sample(network, DDIMScheduler(100), guidance, [semantic, context], seeds=[0], latent_channels=1)
    with pytest.raises(ValueError, match="one weight per branch"):
        GuidanceRule(branches=((False,), (True,)), weights=(1.0,))
    with pytest.raises(ValueError, match="returned batch 2"):
        guidance(lambda x, t: x[:2, :1], latents, 1, [semantic, context])


def test_dropout_rates_match_the_paper():
    n = 100_000
    semantic, context = torch.ones(n, 1, 1, 1), torch.full((n, 1, 1, 1), 2.0)
    dropped_semantic, dropped_context = drop_conditions(semantic, context, generator=torch.Generator().manual_seed(0))
    semantic_dropped, context_dropped = dropped_semantic.flatten() == 0, dropped_context.flatten() == 0
    assert abs(float((context_dropped & ~semantic_dropped).float().mean()) - 0.05) < 0.005
    assert abs(float((semantic_dropped & ~context_dropped).float().mean()) - 0.05) < 0.005
    assert abs(float((semantic_dropped & context_dropped).float().mean()) - 0.05) < 0.005
    assert abs(float((~semantic_dropped & ~context_dropped).float().mean()) - 0.85) < 0.005
    # what is not dropped is untouched
    assert torch.all(dropped_semantic.flatten()[~semantic_dropped] == 1)
    assert torch.all(dropped_context.flatten()[~context_dropped] == 2)


def test_dropout_rates_are_configurable_and_seeded():
    n = 100_000
    semantic, context = torch.ones(n, 2, 3, 3), torch.ones(n, 4, 3, 3)
    kwargs = dict(p_context_only_dropped=0.1, p_semantic_only_dropped=0.2, p_both_dropped=0.3)
    s, c = drop_conditions(semantic, context, **kwargs, generator=torch.Generator().manual_seed(1))
    s_dropped, c_dropped = s.flatten(1).eq(0).all(1), c.flatten(1).eq(0).all(1)
    assert torch.equal(s_dropped, s.flatten(1).eq(0).any(1))  # a whole sample is dropped, never part of it
    assert abs(float((c_dropped & ~s_dropped).float().mean()) - 0.1) < 0.005
    assert abs(float((s_dropped & ~c_dropped).float().mean()) - 0.2) < 0.005
    assert abs(float((s_dropped & c_dropped).float().mean()) - 0.3) < 0.005
    s_again, c_again = drop_conditions(semantic, context, **kwargs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, s_again) and torch.equal(c, c_again)
    with pytest.raises(ValueError, match="sum to at most 1"):
        drop_conditions(semantic, context, 0.5, 0.4, 0.2)
    with pytest.raises(ValueError, match="one batch size"):
        drop_conditions(semantic, context[:3])


class ContextRevealingNetwork(nn.Module):
    """``network(x, t, context)`` with ``x = cat([z, pair])`` and ``context`` ``[B, L, d]``: output
    ``1 + 10 [context is not the -1 null] + 100 [pair != 0] + 0.01 z``."""

    def __init__(self):
        super().__init__()
        self.contexts: list[torch.Tensor] = []

    def forward(self, x, timesteps, context=None):
        self.contexts.append(context.clone())
        has_text = (context != NULL_CONTEXT_VALUE).flatten(1).any(1).float().view(-1, 1, 1, 1)
        has_pair = (x[:, 1:2] != 0).flatten(1).any(1).float().view(-1, 1, 1, 1)
        return 1 + 10 * has_text + 100 * has_pair + 0.01 * x[:, :1]


def test_a_context_condition_is_nulled_with_minus_one_and_passed_as_context():
    network = ContextRevealingNetwork()
    latents, pair, _ = _inputs(batch_size=2)
    text = torch.randn(2, 5, 8)
    guided = double_guidance(3.0, 2.0, kinds=(CONTEXT, CONCAT))(network, latents, 10, [text, pair])
    # (1 - 3) e(∅, ∅) + (3 - 2) e(text, ∅) + 2 e(text, pair) = -2 * 1 + 11 + 2 * 111
    torch.testing.assert_close(guided, 231 + 0.01 * latents)
    (context,) = network.contexts
    assert context.shape == (6, 5, 8)
    assert torch.all(context[:2] == NULL_CONTEXT_VALUE) and NULL_CONTEXT_VALUE == -1.0
    torch.testing.assert_close(context[2:4], text)
    # text-only guidance with the pair always null: s_C = 0 evaluates two branches
    network.contexts.clear()
    text_only = double_guidance(3.0, 0.0, kinds=(CONTEXT, CONCAT))(network, latents, 10, [text, torch.zeros_like(pair)])
    torch.testing.assert_close(text_only, 31 + 0.01 * latents)  # -2 * 1 + 3 * 11
    assert network.contexts[0].shape == (4, 5, 8)
    with pytest.raises(ValueError, match="context condition must be"):
        double_guidance(kinds=(CONTEXT, CONCAT))(network, latents, 10, [pair, pair])
    with pytest.raises(ValueError, match="spatial_shape must be given"):
        guided_sample(network, DDIMScheduler(100), classifier_free_guidance(2.0, CONTEXT), [text], [0, 1], 1)
    samples = guided_sample(network, DDIMScheduler(100), classifier_free_guidance(2.0, CONTEXT), [text], [0, 1], 1,
                            num_inference_steps=2, spatial_shape=(4, 4))  # fmt: skip
    assert samples.latents.shape == (2, 1, 4, 4) and samples.nfe == 2 and samples.branch_evaluations == 4
