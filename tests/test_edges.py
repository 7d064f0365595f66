"""medgen_common.edges: the conditions of the edge-guided LDM (image edges, mask boundary, union) and edge F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet

from medgen_common.edges import EdgeMapd, edge_f1, edge_map, image_edges, mask_boundary


def _square(size: int = 32, top: int = 8, side: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[top : top + side, top : top + side] = 1
    return mask


def test_mask_boundary_of_a_square_is_its_one_pixel_perimeter():
    boundary = mask_boundary(_square())
    expected = np.zeros((32, 32), bool)
    expected[8:20, 8:20] = True
    expected[9:19, 9:19] = False
    np.testing.assert_array_equal(boundary, expected)
    assert boundary.sum() == 4 * 12 - 4


def test_mask_boundary_takes_channel_first_masks_and_labels_above_zero():
    labels = _square()[None] * 3  # a label value, [1, H, W]
    np.testing.assert_array_equal(mask_boundary(labels), mask_boundary(_square()))
    with pytest.raises(ValueError, match=r"mask must be 2D, \[H, W\] or \[1, H, W\]; got shape \(2, 32, 32\)"):
        mask_boundary(np.zeros((2, 32, 32)))


@pytest.mark.parametrize("method", ["canny", "sobel"])
def test_image_edges_lie_on_the_rim_of_a_bright_disk(method):
    rows, cols = np.mgrid[:64, :64]
    radius = np.hypot(rows - 32, cols - 32)
    image = (radius < 15).astype(np.float32) * 0.8 + 0.1
    edges = image_edges(image, method)
    assert edges.any()
    assert np.all(np.abs(radius[edges] - 15) <= 2.5)  # every edge pixel on the rim
    angles = np.arctan2(rows[edges] - 32, cols[edges] - 32)
    assert np.histogram(angles, bins=8, range=(-np.pi, np.pi))[0].min() > 0  # all around it
    assert not image_edges(np.full((16, 16), 0.5), method).any()


def test_union_is_image_edges_or_mask_boundary():
    rows, cols = np.mgrid[:32, :32]
    image = (np.hypot(rows - 16, cols - 16) < 6).astype(np.float32)
    mask = _square()
    union = edge_map(image, mask, "union")[0].numpy().astype(bool)
    np.testing.assert_array_equal(union, image_edges(image) | mask_boundary(mask))
    assert edge_map(image, mask, "mask").shape == (1, 32, 32)
    with pytest.raises(ValueError, match="edge mode 'union' needs the mask"):
        edge_map(image, None, "union")
    with pytest.raises(ValueError, match="mode must be one of"):
        edge_map(image, mask, "hed")


def test_edge_map_transform_adds_the_condition():
    data = {"image": torch.rand(1, 32, 32), "label": torch.from_numpy(_square())[None]}
    out = EdgeMapd(mode="mask")(data)
    np.testing.assert_array_equal(out["edges"][0].numpy().astype(bool), mask_boundary(_square()))
    assert out["image"] is data["image"]


def test_edge_f1_is_one_for_the_same_edges_and_tolerates_small_shifts_only():
    edges = mask_boundary(_square())
    assert edge_f1(edges, edges) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    shifted = np.roll(edges, 2, axis=1)
    assert edge_f1(shifted, edges, tolerance_px=2)["f1"] == 1.0
    three, five = (edge_f1(np.roll(edges, shift, axis=1), edges, tolerance_px=2)["f1"] for shift in (3, 5))
    assert five < three < 0.6  # beyond the tolerance only the overlapping parts of the rows still count
    other = mask_boundary(_square(top=2, side=4))
    assert edge_f1(other, edges)["f1"] == 0.0
    assert edge_f1(np.zeros((32, 32)), edges)["f1"] == 0.0
    assert edge_f1(np.zeros((32, 32)), np.zeros((32, 32)))["f1"] == 1.0


def test_zero_initialised_controlnet_leaves_the_base_prediction_unchanged():
    """MONAI's ControlNet starts with zero output convolutions, so the conditioned prediction equals the base
    model's (the edge branch starts as a no-op)."""
    torch.manual_seed(0)
    settings = dict(spatial_dims=2, in_channels=1, num_res_blocks=1, channels=(8, 16), attention_levels=(False, False),
                    norm_num_groups=8)  # fmt: skip
    base = DiffusionModelUNet(out_channels=1, **settings).eval()
    control = ControlNet(conditioning_embedding_num_channels=(8,), conditioning_embedding_in_channels=1, **settings)
    control.load_state_dict(base.state_dict(), strict=False)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 500])
    edges = edge_map(None, _square(), "mask")[None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        down, middle = control(x, t, controlnet_cond=edges)
        conditioned = base(x, t, down_block_additional_residuals=down, mid_block_additional_residual=middle)
        plain = base(x, t)
    assert all(float(residual.abs().max()) == 0.0 for residual in [*down, middle])
    torch.testing.assert_close(conditioned, plain, rtol=0, atol=1e-6)
