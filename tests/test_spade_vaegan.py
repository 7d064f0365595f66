"""SPADE VAE-GAN image generator: network assembly, trainer, style pairing, rejection inference, contrast checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.networks.nets import MultiScalePatchDiscriminator

from medgen_common.datalist import DatalistError, make_style_pairs
from medgen_common.engines import SpadeGanTrainer
from medgen_common.networks import ContrastClassifier, StyleSpadeGenerator
from medgen_common.spade import StyleSpadeInferer, intensity_ordering, make_synthesis_items, tissue_means
from medgen_common.transforms import LoadStackd, RandPickd, RandSliced, normalise_probabilities
from medgen_common.writers import save_nifti

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "spade_vaegan"


def _generator(spatial_dims=2, label_nc=4, shape=(32, 32)):
    return StyleSpadeGenerator(
        spatial_dims=spatial_dims, label_nc=label_nc, image_shape=shape, style_shape=(32, 32), encoder_channels=[8, 16],
        decoder_channels=[16, 8], z_dim=8, spade_intermediate_channels=8,
    )  # fmt: skip


def _labels(batch=4, channels=4, size=32, seed=0):
    """Soft label maps of horizontal bands (one class per band) with smooth edges, [B, C, size, size]."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(size).float()
    maps = []
    for _ in range(batch):
        edges = torch.sort(torch.randint(4, size - 4, (channels - 1,), generator=generator)).values.float()
        index = (rows[:, None] > edges[None]).sum(1)  # class of each row
        one_hot = torch.nn.functional.one_hot(index, channels).T.float()[:, :, None].expand(channels, size, size)
        maps.append(normalise_probabilities(one_hot + 0.05, recompute_background=False))
    return torch.stack(maps)


def test_generator_keeps_config_channel_lists_and_decodes_2d_and_3d():
    encoder_channels, decoder_channels = [8, 16], [16, 8]
    generator = StyleSpadeGenerator(2, 4, (32, 32), (32, 32), encoder_channels, decoder_channels, z_dim=8)
    assert encoder_channels == [8, 16] and decoder_channels == [16, 8]  # MONAI's SPADE appends to lists it gets
    image, mu, logvar = generator(_labels(2), torch.rand(2, 1, 32, 32))
    assert image.shape == (2, 1, 32, 32) and mu.shape == logvar.shape == (2, 8)
    # 3D decoder with a 2D (sagittal) style encoder
    generator_3d = _generator(spatial_dims=3, shape=(16, 16, 8))
    volume = generator_3d.generate(torch.rand(1, 4, 16, 16, 8).softmax(1), torch.rand(1, 1, 32, 32))
    assert volume.shape == (1, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="2D style_shape"):
        StyleSpadeGenerator(3, 4, (16, 16, 8), (16, 16, 8), [8], [8])
    with pytest.raises(ValueError, match="channels"):
        generator.decode(torch.rand(1, 3, 32, 32), torch.zeros(1, 8))


def test_background_channel_zeroes_the_output_outside_the_label_map():
    torch.manual_seed(0)
    labels = _labels(2)  # band 0 of each map is the background
    plain = _generator()
    masked = _generator()
    masked.load_state_dict(plain.state_dict())
    masked.background_channel = 0
    style = torch.rand(2, 1, 32, 32)
    image, expected = masked.generate(labels, style), plain.generate(labels, style)
    background = labels.argmax(1, keepdim=True) == 0
    assert background.any() and (~background).any()
    assert expected[background].abs().min() > 0  # the unmasked network does not output 0 there by itself
    assert torch.all(image[background] == 0)
    torch.testing.assert_close(image[~background], expected[~background])
    volume = torch.rand(1, 4, 16, 16, 8).softmax(1)
    generator_3d = StyleSpadeGenerator(3, 4, (16, 16, 8), (32, 32), [8, 16], [16, 8], z_dim=8, background_channel=0)
    output = generator_3d.generate(volume, style[:1])
    assert torch.all(output[volume.argmax(1, keepdim=True) == 0] == 0)
    with pytest.raises(ValueError, match="background_channel"):
        StyleSpadeGenerator(2, 4, (32, 32), (32, 32), [8], [8], background_channel=4)


def test_generate_uses_the_posterior_mean():
    generator = _generator().eval()
    labels, style = _labels(1), torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(generator.generate(labels, style), generator.generate(labels, style))
    different_style = generator.generate(labels, torch.rand(1, 1, 32, 32) * 3)
    assert not torch.allclose(generator.generate(labels, style), different_style)


def _trainer(generator, discriminator, batch, epochs, **kwargs):
    return SpadeGanTrainer(
        device="cpu", max_epochs=epochs, train_data_loader=[batch], generator=generator, discriminator=discriminator,
        g_optimizer=torch.optim.Adam(generator.parameters(), 2e-3, betas=(0.0, 0.9)),
        d_optimizer=torch.optim.Adam(discriminator.parameters(), 4e-3, betas=(0.0, 0.9)), **kwargs,
    )  # fmt: skip


def _discriminator(label_nc=4):
    return MultiScalePatchDiscriminator(
        num_d=2,
        num_layers_d=1,
        spatial_dims=2,
        channels=8,
        in_channels=label_nc + 1,
        norm="INSTANCE",
        minimum_size_im=32,
    )


def test_spade_trainer_learns_to_draw_the_label_on_a_fixed_batch():
    torch.manual_seed(0)
    labels = _labels()
    intensities = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 4, 1, 1)
    images = (labels * intensities).sum(1, keepdim=True)  # each class has its own intensity
    batch = {"label": labels, "image": images, "style": images.flip(-1), "contrast": torch.zeros(4, dtype=torch.long)}
    generator, discriminator = _generator(), _discriminator()
    with torch.no_grad():
        before = (generator.generate(labels, batch["style"]) - images).abs().mean()
    trainer = _trainer(
        generator, discriminator, batch, 60, style_augmentation=lambda s: torch.rot90(s, 1, (1, 2)),
        consistency_weight=1.0,
    )  # fmt: skip
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(engine.state.output))
    trainer.run()
    with torch.no_grad():
        after = (generator.generate(labels, batch["style"]) - images).abs().mean()
    assert after < 0.5 * before
    assert outputs[-1]["feature_matching"] < outputs[0]["feature_matching"]
    assert all(torch.isfinite(value) for output in outputs for value in output.values())
    assert outputs[-1]["consistency"] > 0 and outputs[-1]["kld"] > 0 and outputs[-1]["discriminator"] > 0


def test_reconstruction_term_adds_its_weighted_l1_to_the_generator_loss():
    labels = _labels(2)
    batch = {"label": labels, "image": torch.rand(2, 1, 32, 32), "style": torch.rand(2, 1, 32, 32),
             "contrast": torch.zeros(2, dtype=torch.long)}  # fmt: skip
    outputs = []
    for weight in (0.0, 4.0):
        torch.manual_seed(0)  # same networks and the same sampled style code for both weights
        trainer = _trainer(_generator(), _discriminator(), batch, 1, reconstruction_weight=weight)
        torch.manual_seed(1)
        trainer.run()
        outputs.append(trainer.state.output)
    plain, weighted = outputs
    assert float(plain["reconstruction"]) > 0.1
    torch.testing.assert_close(weighted["reconstruction"], plain["reconstruction"])
    torch.testing.assert_close(weighted["loss"] - plain["loss"], 4.0 * plain["reconstruction"])
    with pytest.raises(ValueError, match="reconstruction_weight"):
        _trainer(_generator(), _discriminator(), batch, 1, reconstruction_weight=-1.0)


def test_discriminator_sees_hard_labels_and_classifier_stays_frozen():
    labels = _labels(2)
    seen = []

    class SpyDiscriminator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _discriminator()

        def forward(self, x):
            seen.append(x[:, :4].detach())
            return self.inner(x)

    classifier = ContrastClassifier(3, init_features=4, growth_rate=4, block_config=(1, 1))
    frozen = [p.detach().clone() for p in classifier.parameters()]
    batch = {
        "label": labels,
        "image": torch.rand(2, 1, 32, 32),
        "style": torch.rand(2, 1, 32, 32),
        "contrast": torch.tensor([0, 2]),
    }
    trainer = _trainer(_generator(), SpyDiscriminator(), batch, 1, classifier=classifier, contrast_weight=2.5)
    trainer.run()
    assert all(set(torch.unique(x).tolist()) == {0.0, 1.0} for x in seen)  # one_hot(argmax(label)), not the soft map
    assert all(torch.equal(a, b) for a, b in zip(frozen, classifier.parameters()))
    assert float(trainer.state.output["contrast"]) > 0
    with pytest.raises(ValueError, match="classifier"):
        _trainer(_generator(), _discriminator(), batch, 1, contrast_weight=1.0)
    with pytest.raises(ValueError, match="style_augmentation"):
        _trainer(_generator(), _discriminator(), batch, 1, consistency_weight=1.0)


def test_style_pairs_draw_the_style_from_other_slices_of_the_same_subject():
    entries = [
        {"subject": s, "label": f"{s}_{z}_label", "t1": f"{s}_{z}_t1", "t2": f"{s}_{z}_t2"}
        for s in ("a", "b")
        for z in range(3)
    ]
    items = make_style_pairs(entries, ["t1", "t2"])
    assert len(items) == 12 and {i["contrast"] for i in items} == {0, 1}
    first = items[0]
    # the style is another slice of the same subject and contrast, never the slice itself
    assert first["image"] == "a_0_t1" and first["style"] == ["a_1_t1", "a_2_t1"]
    assert all(s.startswith(i["subject"]) and s != i["image"] for i in items for s in i["style"])
    assert make_style_pairs(entries, ["t2"], style_from_same_entry=True)[0]["style"] == ["a_0_t2"]  # 3D: own volume
    with pytest.raises(DatalistError, match="single slice"):
        make_style_pairs(entries[:1], ["t1"])
    with pytest.raises(DatalistError, match="flair"):
        make_style_pairs(entries, ["flair"])


def test_style_transforms_pick_slice_and_stack(tmp_path):
    picker = RandPickd("style")
    picker.set_random_state(0)
    picks = {picker({"style": ["x", "y", "z"]})["style"] for _ in range(30)}
    assert picks == {"x", "y", "z"}
    volume = torch.zeros(1, 6, 5, 4)
    volume[:, 2:4] = 1.0  # only sagittal slices 2 and 3 hold tissue
    slicer = RandSliced("style", axis=0)
    slicer.set_random_state(0)
    slices = [slicer({"style": volume})["style"] for _ in range(10)]
    assert all(s.shape == (1, 5, 4) and s.sum() == 20 for s in slices)
    paths = []
    for z in range(3):  # slices of one volume: same shape, different affines
        affine = np.eye(4)
        affine[2, 3] = z * 3.0
        paths.append(
            str(save_nifti(np.full((4, 5), z, np.float32), tmp_path / f"s{z}.nii.gz", affine, channel_first=False))
        )
    stacked = LoadStackd("style")({"style": paths})["style"]
    assert stacked.shape == (3, 4, 5, 1) and stacked[2].max() == 2
    save_nifti(np.zeros((3, 3), np.float32), tmp_path / "small.nii.gz", channel_first=False)
    with pytest.raises(ValueError, match="small.nii.gz"):
        LoadStackd("style")({"style": [paths[0], str(tmp_path / "small.nii.gz")]})


class _FirstStyleIsWrong(torch.nn.Module):
    """Classifier stand-in: contrast 1 for images made from a style whose mean is > 0.5, else contrast 0."""

    def __init__(self, generator):
        super().__init__()
        self.generator, self.parameter = generator, torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        bright = (self.generator.last_style_mean > 0.5).float()
        return torch.stack([1 - bright, bright, torch.zeros_like(bright)], 1) * 10

    def split(self, logits):
        return logits, logits[:, :0]


def test_rejection_moves_to_the_next_style_until_the_contrast_is_right():
    generator = _generator().eval()
    original_encode = generator.encode

    def encode(style):
        generator.last_style_mean = style.flatten(1).mean(1)
        return original_encode(style)

    generator.encode = encode
    styles = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])  # sample 0: all dark; sample 1: all bright
    styles[0, 2] = 1.0  # sample 0's third style is bright
    inferer = StyleSpadeInferer(classifier=_FirstStyleIsWrong(generator), threshold=0.75)
    with torch.no_grad():
        images = inferer(_labels(2), generator, styles, contrast=torch.tensor([1, 1]))
    assert images.shape == (2, 1, 32, 32)
    assert inferer.last_tries.tolist() == [3, 1]  # sample 0 accepted at its third style, sample 1 at once
    assert (inferer.last_probability > 0.75).all()
    plain = StyleSpadeInferer()
    with torch.no_grad():
        plain(_labels(2), generator, styles, contrast=torch.tensor([1, 1]))
    assert plain.last_tries.tolist() == [1, 1] and torch.isnan(plain.last_probability).all()


def test_synthesis_items_pair_each_label_with_styles_of_each_contrast():
    items = make_synthesis_items(
        ["/d/sub-1_z010_label.nii.gz"], {"t1": ["a", "b", "d"], "t2": ["c"]}, ["t1", "t2"], tries=3
    )
    assert [i["output_name"] for i in items] == ["sub-1_z010_t1", "sub-1_z010_t2"]
    assert sorted(items[0]["style"]) == ["a", "b", "d"]  # without replacement while the pool is large enough
    assert items[1]["style"] == ["c", "c", "c"]
    with pytest.raises(ValueError, match="flair"):
        make_synthesis_items(["x"], {"t1": ["a"]}, ["flair"])


def test_tissue_ordering_follows_mean_intensity_inside_each_tissue():
    labels = torch.zeros(1, 4, 4, 4)
    labels[0, 1, :, :1], labels[0, 2, :, 1:2], labels[0, 3, :, 2:] = 1, 1, 1  # csf, gm, wm columns
    image = torch.tensor([0.1, 0.5, 0.9, 0.9]).view(1, 1, 1, 4).expand(1, 1, 4, 4)  # T1-like
    means = tissue_means(image, labels, [1, 2, 3])
    torch.testing.assert_close(means, torch.tensor([[0.1, 0.5, 0.9]]))
    assert intensity_ordering(means, ["csf", "gm", "wm"]) == [("wm", "gm", "csf")]
    assert intensity_ordering(-means, ["csf", "gm", "wm"]) == [("csf", "gm", "wm")]  # T2-like


def test_full_scale_perceptual_loss_without_weights_fails_clearly(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ("train_classifier.json", "train_spade.json")])
    parser["bundle_root"] = str(tmp_path)
    with pytest.raises(RuntimeError) as error:  # the config parser wraps the loader's error
        parser.get_parsed_content("perceptual_loss")
    assert isinstance(error.value.__cause__, FileNotFoundError)
    assert "perceptual_vgg.pth" in str(error.value.__cause__) and "Nothing is downloaded" in str(error.value.__cause__)


def test_patch_trained_generator_decodes_a_larger_map_by_sliding_window():
    generator = _generator(spatial_dims=3, shape=(16, 16, 8)).eval()
    inferer = StyleSpadeInferer(roi_size=(16, 16, 8))
    labels = torch.rand(2, 4, 16, 16, 20).softmax(1)  # 20 axial slices, patches of 8
    with torch.no_grad():
        images = inferer(labels, generator, torch.rand(2, 1, 32, 32), contrast=torch.tensor([0, 0]))
    assert images.shape == (2, 1, 16, 16, 20) and torch.isfinite(images).all()


def _parser(*names, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in names])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_3d_demo_config_trains_one_iteration_with_sagittal_styles(tmp_path):
    from medgen_common.demo_data import GENERATORS

    GENERATORS["brain"](tmp_path / "data", n_subjects=3, seed=2, slices_per_subject=2)
    parser = _parser(
        "train_classifier.json", "train_spade.json", "3d_2mm.json", "demo_3d.json", bundle_root=str(tmp_path),
        dataset_dir=str(tmp_path / "data" / "demo"), device_name="cpu", epochs=1, epoch_length=1, batch_size=1,
    )  # fmt: skip
    batch = parser.get_parsed_content("train#dataset")[0]
    assert batch["label"].shape == (8, 56, 72, 64) and batch["image"].shape == (1, 56, 72, 64)
    assert batch["style"].shape == (1, 72, 64)  # a sagittal slice of the same volume and contrast
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.classifier is None  # no modality classifier in 3D (chapter: weights 0)
    trainer.run()
    assert (tmp_path / "models" / "model.pt").is_file()


def test_1mm_config_trains_on_axial_chunks_and_samples_whole_volumes():
    parser = _parser("inference.json", "3d_2mm.json", "3d_1mm.json")
    assert parser.get_parsed_content("patch_size") == [160, 176, 64]
    generator = parser.get_parsed_content("network_def")
    assert generator.decoder.latent_spatial_shape == [10, 11, 4]  # 4 upsamplings of a 64-slice chunk
    assert list(parser.get_parsed_content("inferer").roi_size) == [160, 176, 64]
    train = _parser("train_classifier.json", "train_spade.json", "3d_2mm.json", "3d_1mm.json")
    assert train.get_parsed_content("patch_crop").cropper.roi_size == [160, 176, 64]


def test_synthesis_report_scores_contrast_ordering_and_style_swaps(tmp_path):
    from medgen_common.spade import synthesis_report

    channel_names = ["background", "csf", "gm", "wm"]
    label = np.zeros((4, 8, 8), np.float32)
    label[0, :2], label[1, 2:4], label[2, 4:6], label[3, 6:] = 1, 1, 1, 1  # rows of background, csf, gm, wm
    label_path = str(save_nifti(label, tmp_path / "a_label.nii.gz"))
    rows = {"t1": [0.0, 0.1, 0.5, 0.9], "t2": [0.0, 0.9, 0.5, 0.2]}  # intensity of each class row

    def image(values):
        return np.repeat(np.repeat(np.asarray(values, np.float32), 2)[:, None], 8, 1)

    real = {c: [str(save_nifti(image(v), tmp_path / f"real_{c}.nii.gz", channel_first=False))] for c, v in rows.items()}
    out = tmp_path / "out"
    save_nifti(image(rows["t1"]), out / "a_t1.nii.gz", channel_first=False)  # keeps T1 ordering
    save_nifti(image(rows["t1"]), out / "a_t2.nii.gz", channel_first=False)  # ignores the T2 style
    items = [
        {"label": label_path, "contrast": i, "contrast_name": c, "output_name": f"a_{c}"}
        for i, c in enumerate(("t1", "t2"))
    ]
    report = synthesis_report(items, str(out), channel_names, real, [label_path])
    assert report["expected_ordering"] == {"t1": "wm > gm > csf", "t2": "csf > gm > wm"}
    assert report["ordering_match_rate"] == {"t1": 1.0, "t2": 0.0, "all": 0.5}
    assert report["style_swap_rate"] == {"t1-t2": 0.0, "all": 0.0}
    save_nifti(image(rows["t2"]), out / "a_t2.nii.gz", channel_first=False)
    report = synthesis_report(items, str(out), channel_names, real, [label_path])
    assert report["style_swap_rate"] == {"t1-t2": 1.0, "all": 1.0}


@pytest.mark.parametrize("override", [[], ["demo.json"]])
def test_training_and_inference_define_the_same_networks(override):
    """The generator and classifier are written in the training configs and again in inference.json: they must agree."""
    training = _parser("train_classifier.json", "train_spade.json", *override)
    inference = _parser("inference.json", *override)
    for trained_id, used_id in (("generator_def", "network_def"), ("classifier_def", "classifier_def")):
        trained, used = training.get_parsed_content(trained_id), inference.get_parsed_content(used_id)
        assert trained.state_dict().keys() == used.state_dict().keys()
        assert [p.shape for p in trained.parameters()] == [p.shape for p in used.parameters()]
