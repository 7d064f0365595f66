"""The edge- and text-guided denoiser of edge_guided_ldm: ControlNet on edges, training batches, guided sampling,
Algorithm 1's prompts and the grey head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet

from medgen_common.edge_diffusion import (
    AUGMENTATION_PHRASES,
    edge_fidelity_report,
    generate_augmentations,
    prompt_vocabulary,
    EdgeControlledUNet,
    EdgeDiffusionInferer,
    EdgeDiffusionPrepareBatch,
    EdgeLatentSampler,
    GreyscaleHead,
    augmented_prompts,
)
from medgen_common.edges import edge_map
from medgen_common.sampling import make_scheduler
from medgen_common.text import TextEncoder, make_tokenizer
from medgen_common.text_diffusion import TextConditionedUNet
from tools import bundles as harness

SIZE, LATENT, DIM = 16, 4, 16


def _networks(seed: int = 0) -> tuple[EdgeControlledUNet, AutoencoderKL]:
    torch.manual_seed(seed)
    unet = dict(spatial_dims=2, in_channels=2, num_res_blocks=1, channels=(8, 16), attention_levels=(False, True),
                norm_num_groups=8, num_head_channels=8, with_conditioning=True, cross_attention_dim=DIM)  # fmt: skip
    base = TextConditionedUNet(DiffusionModelUNet(out_channels=2, **unet), TextEncoder(50, 12, DIM, 1, 2), 0, DIM)
    # edges at 16 x 16 down to the 4 x 4 latent: two stride-2 steps in the conditioning embedding
    control = ControlNet(conditioning_embedding_in_channels=1, conditioning_embedding_num_channels=(8, 8, 8), **unet)
    autoencoder = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8, 8), latent_channels=2,
                                num_res_blocks=1, norm_num_groups=8, attention_levels=(False, False, False))  # fmt: skip
    with torch.no_grad():  # MONAI zero-initialises the U-Net's output convolutions; a trained U-Net has weights there
        for parameter in base.unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    return EdgeControlledUNet(base, control), autoencoder


def _square_edges(top: int, batch: int = 2) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE)
    mask[top : top + 6, top : top + 6] = 1
    return edge_map(None, mask, "mask")[None].repeat(batch, 1, 1, 1)


def _wake_controlnet(network: EdgeControlledUNet) -> None:
    """Give the zero-initialised parameters (edge embedding output, residual outputs, block outputs) weights, as
    training would."""
    with torch.no_grad():
        for parameter in network.controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)


def test_a_fresh_controlnet_leaves_the_text_model_s_prediction_unchanged():
    network, _ = _networks()
    x, t, tokens = torch.randn(2, 2, LATENT, LATENT), torch.tensor([10, 700]), torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        context = network.encode_context(tokens)
        controlled = network(x, t, context=context, edges=_square_edges(2))
        text_only = network.base.unet(x, t, context=context)
    assert text_only.abs().max() > 0.1
    torch.testing.assert_close(controlled, text_only, rtol=0, atol=1e-6)


def test_edges_steer_the_prediction_once_the_branch_has_weights():
    network, _ = _networks()
    _wake_controlnet(network)
    x, t, tokens = torch.randn(2, 2, LATENT, LATENT), torch.tensor([10, 700]), torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        first, second = (network(x, t, tokens=tokens, edges=_square_edges(top)) for top in (2, 8))
        again = network(x, t, tokens=tokens, edges=_square_edges(2))
    assert (first - second).abs().max() > 1e-3 and torch.equal(first, again)
    with pytest.raises(ValueError, match="needs the text .* and the edges"):
        network(x, t, tokens=tokens)


def test_training_on_a_fixed_batch_lowers_the_loss_and_keeps_the_edges():
    network, autoencoder = _networks()
    scheduler = make_scheduler("ddpm", 1000)
    prepare = EdgeDiffusionPrepareBatch(1000, autoencoder, 1.0, p_text_dropped=0.0)
    inferer = EdgeDiffusionInferer(scheduler)
    batch = {"image": torch.rand(4, 1, SIZE, SIZE), "tokens": torch.randint(1, 50, (4, 6)),
             "edges": _square_edges(3, 4)}  # fmt: skip
    torch.manual_seed(0)
    latents, noise, _, kwargs = prepare(batch, "cpu")
    assert torch.equal(kwargs["edges"], batch["edges"]) and kwargs["keep_text"].all()
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        prediction = inferer(latents, network, **kwargs)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    controlnet_grads = [p.grad for p in network.controlnet.parameters() if p.grad is not None]
    assert controlnet_grads and any(g.abs().sum() > 0 for g in controlnet_grads)  # the edge branch learns too


def test_sampler_guides_on_text_with_the_edges_in_every_branch():
    network, autoencoder = _networks()
    _wake_controlnet(network)
    sampler = EdgeLatentSampler(autoencoder, make_scheduler("ddim"), 4, (2, LATENT, LATENT), text_scale=3.0, amp=False)
    tokens = torch.randint(1, 50, (2, 6))
    images = sampler(tokens, network, _square_edges(2), seeds=[0, 1])
    assert images.shape == (2, 1, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1 and sampler.last_nfe == 4
    assert torch.equal(images, sampler(tokens, network, _square_edges(2), seeds=[0, 1]))  # seeded
    assert not torch.equal(images, sampler(tokens, network, _square_edges(8), seeds=[0, 1]))  # edges matter
    with pytest.raises(ValueError, match=r"edges must be \[B, 1, H, W\] with B = 2"):
        sampler(tokens, network, _square_edges(2, 3))


def test_augmented_prompts_append_a_seeded_phrase():
    prompts = augmented_prompts("ultrasound, breast, benign lesion", 5, seed=3)
    assert prompts == augmented_prompts("ultrasound, breast, benign lesion", 5, seed=3)
    assert all(p.startswith("ultrasound, breast, benign lesion, ") for p in prompts)
    assert {p.rsplit(", ", 1)[1] for p in prompts} <= set(AUGMENTATION_PHRASES)
    assert augmented_prompts("MR T2, prostate, no lesion", 2, 0, phrases=()) == ["MR T2, prostate, no lesion"] * 2


def test_grey_head_is_the_mean_of_the_rgb_channels():
    rgb = torch.nn.Conv2d(1, 3, 3, padding=1)
    x = torch.rand(2, 1, 8, 8)
    grey = GreyscaleHead(rgb)(x)
    assert grey.shape == (2, 1, 8, 8)
    torch.testing.assert_close(grey, rgb(x).mean(1, keepdim=True))


def test_demo_task_prompts_and_their_augmentations_tokenize_with_the_word_vocabulary(tmp_path):
    from medgen_common.datalist import load_datalist
    from medgen_common.demo_data import make_segmentation_tasks_dataset

    datalist = make_segmentation_tasks_dataset(tmp_path, n_subjects=6)["demo/2d"]
    prompts = [e["prompt"] for split in ("training", "pretraining") for e in load_datalist(datalist, split, ["image"])]
    assert {p.split(", ")[0] for p in prompts} == {"ultrasound", "MR T2", "MR ADC", "MR DWI"}
    tokenizer = make_tokenizer("word", 16, vocabulary=prompt_vocabulary())
    for prompt in prompts:
        tokens = tokenizer(augmented_prompts(prompt, 3, seed=0))
        assert tokens.shape == (3, 16) and (tokens[:, 0] > 0).all()
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tokenizer("MR T1, knee, meniscus tear")


class EdgeCopyingSampler:
    """A stand-in generator that draws exactly its conditioning edges: a perfect edge follower."""

    def __call__(self, tokens, network, edges, seeds=None):
        return edges.clone()


def _square_case(index: int) -> dict:
    mask = torch.zeros(1, 32, 32)
    top, left = 3 + 5 * (index % 4), 4 + 3 * index
    mask[:, top : top + 9, left : left + 7] = 1
    return {"image": 0.2 + 0.6 * mask, "label": mask}


def test_edge_fidelity_is_high_for_a_generator_that_follows_its_edges_and_low_against_other_edges(tmp_path):
    cases = {f"s{i}": _square_case(i) for i in range(5)}
    entries = [{"image": f"{s}.nii.gz", "label": f"{s}_label.nii.gz", "subject": s, "task": "toy", "prompt": "CT, organ, normal"}
               for s in cases]  # fmt: skip
    tokenizer = lambda prompts: torch.zeros(len(prompts), 4, dtype=torch.long)  # noqa: E731
    report = edge_fidelity_report(EdgeCopyingSampler(), None, tokenizer, entries, lambda e: cases[e["subject"]],
                                  tmp_path, batch_size=2, edge_settings={"mode": "mask"})  # fmt: skip
    assert report["edge_f1"]["mean"] > 0.9 and report["edge_f1_shuffled"]["mean"] < 0.5
    assert report["num_images"] == 5 and report["paired_fidelity"]["mae"]["mean"] > 0
    assert (tmp_path / "evaluation.json").is_file() and (tmp_path / "edges.png").is_file()
    single = edge_fidelity_report(EdgeCopyingSampler(), None, tokenizer, entries[:1], lambda e: cases[e["subject"]],
                                  tmp_path / "one", edge_settings={"mode": "mask"})  # fmt: skip
    assert single["edge_f1"]["mean"] > 0.9 and single["edge_f1"]["sd"] == 0.0
    assert (
        np.isnan(single["edge_f1_shuffled"]["mean"]) and single["edge_f1_shuffled"]["note"] == "needs at least 2 images"
    )


def test_algorithm_1_writes_n_samples_per_source_with_the_source_label(tmp_path):
    network, autoencoder = _networks()
    sampler = EdgeLatentSampler(autoencoder, make_scheduler("ddim"), 2, (2, LATENT, LATENT), amp=False)
    cases = {f"s{i}": {"image": torch.rand(1, SIZE, SIZE), "label": _square_edges(2 + 2 * i, 1)[0]} for i in range(3)}
    entries = [{"image": f"/data/{s}.nii.gz", "label": f"/data/{s}_label.nii.gz", "subject": s, "task": "toy",
                "prompt": "ultrasound, breast, benign lesion"} for s in cases]  # fmt: skip
    tokenizer = make_tokenizer("word", 12, vocabulary=prompt_vocabulary())
    paths = generate_augmentations(sampler, network, tokenizer, entries, lambda e: cases[e["subject"]], tmp_path,
                                   samples_per_image=2, num_samples=5, batch_size=3, seed=10)  # fmt: skip
    assert [p.name for p in paths] == ["s0_aug00_image.nii.gz", "s0_aug01_image.nii.gz", "s1_aug00_image.nii.gz",
                                       "s1_aug01_image.nii.gz", "s2_aug00_image.nii.gz"]  # fmt: skip
    written = json.loads((tmp_path / "datalist_synthetic.json").read_text())["training"]
    assert [e["label"] for e in written] == [entries[i]["label"] for i in (0, 0, 1, 1, 2)]
    assert [e["seed"] for e in written] == [10, 11, 12, 13, 14] and all(e["task"] == "toy" for e in written)
    assert all(e["prompt"].startswith("ultrasound, breast, benign lesion, ") for e in written)
    assert (tmp_path / "samples.png").is_file()
    with pytest.raises(ValueError, match="7 samples at 2 per image need 4 source images, 3 given"):
        generate_augmentations(sampler, network, tokenizer, entries, lambda e: cases[e["subject"]], tmp_path,
                               samples_per_image=2, num_samples=7)  # fmt: skip


def test_training_prompts_carry_augmentation_phrases_at_the_asked_rate():
    from medgen_common.edge_diffusion import RandAugmentationPhrased

    transform = RandAugmentationPhrased("prompt", prob=0.3)
    transform.set_random_state(0)
    prompts = [transform({"prompt": "MR T2, prostate, no lesion"})["prompt"] for _ in range(2000)]
    phrased = [p for p in prompts if p != "MR T2, prostate, no lesion"]
    assert len(phrased) / len(prompts) == pytest.approx(0.3, abs=0.03)
    assert {p.rsplit(", ", 1)[1] for p in phrased} == set(AUGMENTATION_PHRASES)
    with pytest.raises(ValueError, match="prob"):
        RandAugmentationPhrased("prompt", prob=1.5)


def test_sampling_weights_the_controlnet_residuals_by_two_and_training_by_one():
    """The bundle trains with conditioning_scale 1 and samples with 2 (edge F1 0.55 -> 0.61 on the demo)."""
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "edge_guided_ldm"
    train = ["configs/train_autoencoder.json", "configs/train_diffusion.json", "configs/train_finetune.json"]
    scales = {}
    for name, files in (("finetune", train), ("inference", [*train[:2], "configs/inference.json"])):
        parser = ConfigParser()
        parser.read_config(harness.config_paths(bundle, files, demo=True))
        parser["bundle_root"] = str(bundle)
        scales[name] = parser.get_parsed_content("network_def").conditioning_scale
    assert scales == {"finetune": 1.0, "inference": 2.0}
