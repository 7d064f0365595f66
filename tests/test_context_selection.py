"""Context selection of the CSG bundle (paper §2.1.1): Gram style descriptors and nearest-other-image pairing."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL
from PIL import Image

from medgen_common.context_selection import (
    BlockFeatures,
    GramDescriptor,
    RandomFeatureGramDescriptor,
    VGG19Features,
    compute_style_descriptors,
    gram_matrix,
    load_style_network,
    make_context_datalist,
    select_context,
)


def _stripes(period: float, count: int, generator: torch.Generator, size: int = 64) -> list[torch.Tensor]:
    """Vertical sinusoidal stripes of one period, random phase, light noise: ``count`` images ``[1, size, size]``."""
    x = torch.arange(size).float().expand(size, size)
    images = []
    for _ in range(count):
        phase = float(torch.rand(1, generator=generator)) * 2 * math.pi
        noise = 0.05 * torch.randn(size, size, generator=generator)
        images.append((0.5 + 0.3 * torch.sin(2 * math.pi * x / period + phase) + noise).clamp(0, 1)[None])
    return images


def _smooth_noise(correlation_length: float, count: int, generator: torch.Generator, size: int = 64) -> list:
    """Gaussian-filtered white noise (std ``correlation_length`` px), unit contrast around 0.5: ``[1, size, size]``."""
    radius = int(3 * correlation_length)
    taps = torch.exp(-((torch.arange(2 * radius + 1) - radius).float() ** 2) / (2 * correlation_length**2))
    taps = taps / taps.sum()
    images = []
    for _ in range(count):
        noise = F.pad(torch.randn(1, 1, size, size, generator=generator), (radius,) * 4, mode="circular")
        smooth = F.conv2d(F.conv2d(noise, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
        images.append((0.5 + 0.15 * smooth[0] / smooth.std()).clamp(0, 1))
    return images


def _texture_set(per_texture: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Four textures (stripes of period 4 and 10 px, noise of correlation length 1 and 4 px): images ``[N, 1, 64,
    64]`` and their texture index ``[N]``."""
    generator = torch.Generator().manual_seed(seed)
    sets = [
        _stripes(4, per_texture, generator), _stripes(10, per_texture, generator),
        _smooth_noise(1.0, per_texture, generator), _smooth_noise(4.0, per_texture, generator),
    ]  # fmt: skip
    images = torch.stack([image for texture in sets for image in texture])
    return images, torch.arange(len(sets)).repeat_interleave(per_texture)


# --- descriptors -----------------------------------------------------------------------------------------------------


def test_gram_matrix_is_normalised_by_the_number_of_positions():
    features = torch.ones(1, 2, 4, 4)
    features[:, 1] = 3.0
    expected = torch.tensor([[1.0, 3.0], [3.0, 9.0]])
    assert torch.allclose(gram_matrix(features)[0], expected)
    assert torch.allclose(gram_matrix(features.repeat(1, 1, 3, 5))[0], expected)  # independent of the image size


def test_random_descriptor_is_deterministic_by_seed_and_frozen():
    images = _texture_set(per_texture=2)[0]
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    descriptor = RandomFeatureGramDescriptor(seed=7)
    assert torch.equal(torch.rand(3), expected_draw)  # building it leaves the global random state alone

    first = compute_style_descriptors(images, descriptor)
    assert first.shape == (8, 16**2 + 32**2 + 64**2)
    assert torch.equal(first, compute_style_descriptors(images, RandomFeatureGramDescriptor(seed=7)))
    assert not torch.allclose(first, compute_style_descriptors(images, RandomFeatureGramDescriptor(seed=8)))
    assert not any(parameter.requires_grad for parameter in descriptor.parameters())
    assert not descriptor.train().training  # stays in eval mode


def test_random_descriptor_picks_an_image_of_the_same_texture():
    images, texture = _texture_set(per_texture=10)
    descriptors = compute_style_descriptors(images, RandomFeatureGramDescriptor(seed=0), batch_size=7)
    selection = select_context(descriptors)
    assert torch.equal(texture[selection.index], texture), "a context was taken from another texture"


def test_descriptors_of_an_image_stream_match_those_of_a_batch_and_accept_mixed_sizes():
    images = _texture_set(per_texture=2)[0]
    descriptor = RandomFeatureGramDescriptor(seed=0)
    batched = compute_style_descriptors(images, descriptor, batch_size=8)
    streamed = compute_style_descriptors(iter(list(images)), descriptor, batch_size=3)
    assert torch.allclose(streamed, batched, rtol=1e-5, atol=1e-9)
    mixed = compute_style_descriptors([images[0], images[1, :, :32, :48]], descriptor)
    assert mixed.shape == (2, batched.shape[1])


def test_standardised_layers_contribute_equally():
    images = _texture_set(per_texture=3)[0]
    descriptors = compute_style_descriptors(images, RandomFeatureGramDescriptor(seed=0), standardise_layers=True)
    blocks = descriptors.split([16**2, 32**2, 64**2], dim=1)
    for block in blocks:  # root mean over entries of the variance across images is 1 in every layer
        assert block.var(dim=0).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_block_features_of_an_autoencoder_encoder_feed_a_gram_descriptor():
    autoencoder = AutoencoderKL(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), latent_channels=2, num_res_blocks=1,
        attention_levels=(False, False), norm_num_groups=8, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )  # fmt: skip
    images = torch.rand(3, 1, 16, 16)
    features = BlockFeatures(autoencoder.encoder.blocks)(images)
    assert len(features) == len(autoencoder.encoder.blocks)
    assert torch.allclose(features[-1], autoencoder.encoder(images))
    descriptor = GramDescriptor(BlockFeatures(autoencoder.encoder.blocks))
    assert descriptor(images).shape == (3, sum(f.shape[1] ** 2 for f in features))
    assert not any(parameter.requires_grad for parameter in autoencoder.encoder.parameters())  # frozen in place


# --- the pretrained (local-only) VGG path ----------------------------------------------------------------------------


def test_style_network_loader_fails_clearly_when_the_file_is_absent(tmp_path):
    missing = tmp_path / "vgg19.pth"
    with pytest.raises(FileNotFoundError, match="vgg19.pth.*Nothing is downloaded"):
        load_style_network(missing)
    with pytest.raises(FileNotFoundError, match="RandomFeatureGramDescriptor"):
        load_style_network(None)


def test_style_network_loader_reads_a_torchvision_vgg19_state_dict(tmp_path):
    layers = ("conv1_1", "conv2_1")
    reference = VGG19Features(layers)
    state = dict(reference.state_dict())
    state["features.10.weight"] = torch.zeros(256, 128, 3, 3)  # a deeper layer the trunk does not build
    state["classifier.0.weight"] = torch.zeros(4, 8)  # the classifier of the full network
    torch.save(state, tmp_path / "vgg19.pth")

    network = load_style_network(tmp_path / "vgg19.pth", network_kwargs={"layers": layers})
    assert not any(parameter.requires_grad for parameter in network.parameters())
    assert torch.equal(network.features[0].weight, reference.features[0].weight)
    images = torch.rand(2, 1, 32, 32)
    maps = network(images)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 32, 32), (2, 128, 16, 16)]
    assert GramDescriptor(network)(images).shape == (2, 64**2 + 128**2)

    del state["features.5.weight"]  # conv2_1 missing: the file does not fit the requested layers
    torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(RuntimeError, match="features.5.weight"):
        load_style_network(tmp_path / "incomplete.pth", network_kwargs={"layers": layers})


# --- selection -------------------------------------------------------------------------------------------------------


def test_select_context_never_returns_the_query_itself_even_for_duplicates():
    descriptors = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    duplicated = torch.cat([descriptors, descriptors])
    selection = select_context(duplicated)
    assert torch.equal(selection.index, torch.tensor([5, 6, 7, 8, 9, 0, 1, 2, 3, 4]))
    assert torch.all(selection.mse == 0)

    identical = select_context(torch.ones(4, 3))
    assert torch.all(identical.index != torch.arange(4))


def test_select_context_is_the_nearest_other_item_by_mse():
    descriptors = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    mse = ((descriptors[:, None] - descriptors[None]) ** 2).mean(dim=2)
    mse.fill_diagonal_(float("inf"))
    selection = select_context(descriptors, chunk_size=2)
    assert torch.equal(selection.index, mse.argmin(dim=1))
    assert torch.allclose(selection.mse, mse.min(dim=1).values, rtol=1e-5)


def test_select_context_respects_group_exclusion():
    # items 0 and 1 (clip "a") are near each other; 2 and 3 (clip "b") are further away
    descriptors = torch.tensor([[0.0], [0.1], [1.0], [3.0]])
    groups = ["a", "a", "b", "b"]
    assert select_context(descriptors).index.tolist() == [1, 0, 1, 2]
    assert select_context(descriptors, groups, exclude_same_group=True).index.tolist() == [2, 2, 1, 1]

    with pytest.raises(ValueError, match="item 0 has no context candidate.*'a'"):
        select_context(descriptors, ["a", "a", "a", "a"], exclude_same_group=True)
    with pytest.raises(ValueError, match="needs groups"):
        select_context(descriptors, exclude_same_group=True)
    with pytest.raises(ValueError, match="one identifier per descriptor"):
        select_context(descriptors, ["a", "b"], exclude_same_group=True)
    with pytest.raises(ValueError, match="N >= 2"):
        select_context(descriptors[:1])


# --- datalist pairing ------------------------------------------------------------------------------------------------


def test_make_context_datalist_pairs_each_image_with_a_same_texture_image(tmp_path):
    images, texture = _texture_set(per_texture=4)
    data_dir = tmp_path / "data"
    (data_dir / "images").mkdir(parents=True)
    entries = []
    for index, (image, kind) in enumerate(zip(images, texture.tolist())):
        name = f"images/{index:02d}.png"
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(data_dir / name)
        subject = f"texture{kind}-clip{index % 2}"  # two clips of every texture
        entries.append({"image": name, "label": f"labels/{index:02d}.png", "subject": subject, "device": f"dev{kind}"})
    datalist = {"training": entries[::2] + entries[1::2], "validation": entries[:4], "labels": ["bg", "tendon"]}
    (data_dir / "datalist.json").write_text(json.dumps(datalist))

    output_path = tmp_path / "pairs" / "datalist_context.json"
    written = make_context_datalist(
        data_dir / "datalist.json", output_path, RandomFeatureGramDescriptor(seed=0), image_key="image",
        exclude_same_group=True, intensity_range=(0, 255),
    )  # fmt: skip
    assert json.loads(output_path.read_text()) == written
    assert written["labels"] == ["bg", "tendon"]
    texture_of = {entry["image"]: int(entry["device"][3:]) for entry in entries}
    for split in ("training", "validation"):
        assert len(written[split]) == len(datalist[split])
        for entry in written[split]:
            # paths outside the new datalist's folder become absolute (a datalist may not climb out of its root)
            assert all(os.path.isfile(output_path.parent / entry[key]) for key in ("image", "context"))
            assert entry["label"] == str(data_dir / "labels" / os.path.basename(entry["label"]))
            own, context = (os.path.relpath(output_path.parent / entry[key], data_dir) for key in ("image", "context"))
            assert context != own and entry["context_subject"] != entry["subject"]
            assert texture_of[context] == texture_of[own] and entry["context_device"] == entry["device"]
    validation_images = {entry["image"] for entry in written["validation"]}
    assert all(entry["context"] in validation_images for entry in written["validation"])  # split-internal pairs

    with pytest.raises(ValueError, match="at least two entries"):
        make_context_datalist(data_dir / "datalist.json", output_path, RandomFeatureGramDescriptor(), splits=["test"])
