"""V-EUS building blocks: strain colour coding, the colour-rebalancing prior (Eq. 8.1), the tumour box crop, the
pix2pix generator and the bi-discriminator training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import PatchDiscriminator

from medgen_common.elastography import (
    JET_PALETTE,
    ColourPrior,
    crop_boxes,
    index_to_rgb,
    index_to_strain,
    lesion_boxes,
    rgb_to_index,
    rgb_to_lab,
    strain_ratio,
    strain_to_index,
)
from medgen_common.engines import BiDiscriminatorPix2PixTrainer
from medgen_common.networks import Pix2PixUNetGenerator


def test_palette_runs_from_hard_blue_to_soft_red_and_decodes_back():
    assert JET_PALETTE.shape == (64, 3)
    assert JET_PALETTE[0].argmax() == 2 and JET_PALETTE[63].argmax() == 0  # blue = hard, red = soft
    index = np.arange(64).reshape(8, 8)
    np.testing.assert_array_equal(rgb_to_index(index_to_rgb(index)), index)
    eight_bit = torch.round(torch.tensor(index_to_rgb(index))[None] * 255) / 255  # as stored in a PNG screenshot
    torch.testing.assert_close(rgb_to_index(eight_bit)[0], torch.as_tensor(index))
    np.testing.assert_array_equal(strain_to_index(index_to_strain(index)), index)
    assert strain_to_index(np.array([0.01, 1.0, 100.0])).tolist() == [0, 32, 63]  # clipped at 1/4 and 4, 1 mid-bar


def test_strain_ratio_of_a_stiff_lesion():
    index = np.full((32, 32), 32)
    mask = np.zeros((32, 32), bool)
    mask[12:20, 12:20] = True
    index[mask] = 0  # strain 1/4 against about 1 around it
    assert strain_ratio(index, mask) == pytest.approx(float(index_to_strain(32)) / 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        strain_ratio(index, np.zeros_like(mask))


def test_rgb_to_lab_matches_skimage():
    skimage_color = pytest.importorskip("skimage.color")
    rgb = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor(skimage_color.rgb2lab(rgb.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(rgb_to_lab(rgb), expected, atol=0.02, rtol=0)


def test_colour_prior_weights_on_a_hand_made_histogram(tmp_path):
    # 60 % dark blue, 30 % green, 10 % dark red: three occupied ab bins
    counts = {0: 60, 31: 30, 63: 10}
    index = np.concatenate([np.full(n, i) for i, n in counts.items()]).reshape(10, 10)
    rgb = torch.tensor(index_to_rgb(index))
    prior = ColourPrior.fit([rgb], alpha=0.8)
    p = np.array([0.6, 0.3, 0.1])
    gamma = 1.0 / (0.8 * p + 0.2 / 3)
    gamma /= (p * gamma).sum()  # E_p[gamma] = 1
    weights = prior.pixel_weights(rgb[None])[0, 0]
    for (colour, _), expected in zip(counts.items(), gamma):
        torch.testing.assert_close(weights[torch.as_tensor(index == colour)], torch.full((counts[colour],), float(expected)))
    assert weights[torch.as_tensor(index == 63)][0] > weights[torch.as_tensor(index == 0)][0]  # rare colours weigh more
    loaded = ColourPrior.load(prior.save(tmp_path / "prior.json"))
    torch.testing.assert_close(loaded.pixel_weights(rgb[None]), prior.pixel_weights(rgb[None]))
    with pytest.raises(FileNotFoundError, match="colour prior"):
        ColourPrior.load(tmp_path / "absent.json")


def test_lesion_box_is_square_with_margin_inside_the_image_and_falls_back_to_the_whole_image():
    masks = torch.zeros(3, 1, 64, 64)
    masks[0, 0, 20:40, 24:34] = 1  # 20 x 10 lesion in the middle
    masks[1, 0, 0:6, 58:64] = 1  # lesion touching the top-right corner
    boxes = lesion_boxes(masks, margin=0.25, min_size=16)
    side = boxes[:, 2] - boxes[:, 0]
    torch.testing.assert_close(side, boxes[:, 3] - boxes[:, 1])
    torch.testing.assert_close(boxes[0], torch.tensor([17.5, 16.5, 42.5, 41.5]))  # 20 * 1.25 = 25 around (30, 29)
    torch.testing.assert_close(boxes[1], torch.tensor([0.0, 48.0, 16.0, 64.0]))  # min size, shifted inside
    torch.testing.assert_close(boxes[2], torch.tensor([0.0, 0.0, 64.0, 64.0]))  # empty mask: whole image
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        lesion_boxes(masks[:, 0])


def test_crop_boxes_resamples_the_box_and_passes_gradients():
    columns = torch.arange(64.0).view(1, 1, 1, 64).expand(2, 1, 64, 64).clone().requires_grad_(True)
    crops = crop_boxes(columns, torch.tensor([[0.0, 48.0, 16.0, 64.0], [0.0, 0.0, 64.0, 64.0]]), size=8)
    assert crops.shape == (2, 1, 8, 8)
    torch.testing.assert_close(crops[0, 0, 0], torch.arange(48.5, 64.0, 2.0))  # 2-pixel cells of columns 48-63
    torch.testing.assert_close(crops[1, 0, 0], torch.arange(3.5, 64.0, 8.0))
    crops.sum().backward()
    assert columns.grad is not None and columns.grad.abs().sum() > 0


def test_pix2pix_generator_matches_the_book_and_the_code():
    def count(network):
        return sum(p.numel() for p in network.parameters())

    book = Pix2PixUNetGenerator(num_downs=7)
    assert [up[1].in_channels for up in book.up][::-1] == [512, 1024, 1024, 1024, 512, 256, 128]  # chapter L2560
    assert count(book) == pytest.approx(41.8e6, rel=0.01)
    assert count(Pix2PixUNetGenerator(num_downs=8)) == pytest.approx(54.4e6, rel=0.01)  # pix2pix unet_256
    assert sum(isinstance(m, torch.nn.Dropout) for m in book.modules()) == 2
    small = Pix2PixUNetGenerator(num_downs=4, channels=8, max_channels=32).eval()
    output = small(torch.randn(2, 1, 32, 32))
    assert output.shape == (2, 3, 32, 32) and output.abs().max() <= 1.0
    with pytest.raises(ValueError, match="divisible by 16"):
        small(torch.randn(1, 1, 24, 32))


def _discriminator() -> PatchDiscriminator:
    return PatchDiscriminator(2, channels=8, in_channels=4, out_channels=1, num_layers_d=2, kernel_size=4, padding=1)


def _trainer(batch, iterations, tumour=True, prior=True, l1_weight=100.0, nonfinite_loss="raise"):
    torch.manual_seed(0)
    generator = Pix2PixUNetGenerator(num_downs=4, channels=8, max_channels=32, dropout=0.0)
    global_discriminator, tumour_discriminator = _discriminator(), (_discriminator() if tumour else None)

    def adam(network):
        return torch.optim.Adam(network.parameters(), 2e-3, betas=(0.5, 0.999)) if network is not None else None

    colour_prior = ColourPrior.fit([(batch["elastogram"] + 1) / 2]) if prior else None
    trainer = BiDiscriminatorPix2PixTrainer(
        "cpu", 1, [batch] * iterations, generator, global_discriminator, adam(generator), adam(global_discriminator),
        tumour_discriminator, adam(tumour_discriminator), colour_prior, l1_weight=l1_weight, min_box_size=8, crop_size=16,
        nonfinite_loss=nonfinite_loss,
    )  # fmt: skip
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(dict(engine.state.output)))
    return trainer, outputs


def _batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    index = np.full((4, 32, 32), 40)
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 10:20, 12:22] = 1
    index[mask[:, 0].bool().numpy()] = 5  # stiff (blue) lesion in soft (yellow) tissue
    bmode = 0.5 + 0.1 * torch.randn(4, 1, 32, 32, generator=generator) - 0.3 * mask  # dark lesion
    elastogram = torch.stack([torch.tensor(index_to_rgb(i)) for i in index])
    return {"bmode": bmode * 2 - 1, "elastogram": elastogram * 2 - 1, "mask": mask}


def test_bi_discriminator_step_learns_the_mapping_on_a_fixed_batch():
    trainer, outputs = _trainer(_batch(), iterations=40)
    trainer.run()
    assert set(outputs[0]) == {"loss", "l1", "adversarial_global", "adversarial_tumour", "discriminator_global", "discriminator_tumour"}
    assert all(float(o["discriminator_tumour"]) > 0 for o in outputs)
    assert float(outputs[-1]["l1"]) < 0.5 * float(outputs[0]["l1"])


@pytest.mark.parametrize("tumour, prior", [(False, True), (True, False)], ids=["no_tumour_discriminator", "plain_l1"])
def test_ablations_switch_their_part_off(tumour, prior):
    batch = _batch()
    trainer, outputs = _trainer(batch, iterations=2, tumour=tumour, prior=prior)
    trainer.run()
    if not tumour:
        assert all(float(o["adversarial_tumour"]) == 0 and float(o["discriminator_tumour"]) == 0 for o in outputs)
    else:  # plain L1: the first step's l1 is the unweighted mean absolute error
        with torch.no_grad():
            torch.manual_seed(0)
            untrained = Pix2PixUNetGenerator(num_downs=4, channels=8, max_channels=32, dropout=0.0).train()
            expected = (untrained(batch["bmode"]) - batch["elastogram"]).abs().mean()
        torch.testing.assert_close(outputs[0]["l1"], expected)
    with pytest.raises(ValueError, match="together"):
        BiDiscriminatorPix2PixTrainer("cpu", 1, [batch], trainer.generator, _discriminator(), trainer.g_optimizer,
                                      trainer.global_optimizer, tumour_discriminator=_discriminator())  # fmt: skip


def test_a_non_finite_loss_stops_training_naming_the_loss_and_iteration():
    trainer, _ = _trainer(_batch(), iterations=1, l1_weight=float("inf"))
    with pytest.raises(FloatingPointError, match="generator loss is inf at iteration 1"):
        trainer.run()


def test_skip_mode_drops_non_finite_generator_updates_and_counts_them():
    trainer, _ = _trainer(_batch(), iterations=3, l1_weight=float("inf"), nonfinite_loss="skip")
    before = [p.detach().clone() for p in trainer.generator.parameters()]
    trainer.run()
    assert trainer.state.skipped_nonfinite_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters()))
    with pytest.raises(ValueError, match="'raise' or 'skip'"):
        _trainer(_batch(), iterations=1, nonfinite_loss="ignore")
