"""Tests of medgen_common.writers: NIfTI layout and affine, atomic writes, PNG grids and JSON round trips."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medgen_common.writers import (
    LABEL_PALETTE,
    atomic_path,
    image_to_uint8,
    label_map_to_rgb,
    read_json,
    save_nifti,
    save_png_grid,
    write_json,
)

# --- save_nifti ------------------------------------------------------------------------------------------------------


def test_save_nifti_writes_2d_channel_first_map_as_h_w_1_c(tmp_path):
    label = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)  # [C, H, W]
    path = save_nifti(label, tmp_path / "label.nii.gz", spacing=(0.5, 2.0))
    assert path == tmp_path / "label.nii.gz"
    image = nib.load(str(path))
    assert image.shape == (4, 5, 1, 3)
    data = np.asarray(image.dataobj)
    for c in range(3):
        np.testing.assert_array_equal(data[:, :, 0, c], label[c].numpy())
    np.testing.assert_allclose(image.affine, np.diag([0.5, 2.0, 1.0, 1.0]))
    assert image.header.get_xyzt_units()[0] == "mm"


def test_save_nifti_writes_3d_channel_first_map_as_h_w_d_c_with_spacing(tmp_path):
    volume = np.random.default_rng(0).random((2, 4, 5, 6)).astype(np.float32)  # [C, H, W, D]
    path = save_nifti(volume, tmp_path / "vol.nii", spacing=[1.5, 2.0, 3.0])
    image = nib.load(str(path))
    assert image.shape == (4, 5, 6, 2)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.moveaxis(volume, 0, -1))
    np.testing.assert_allclose(image.affine, np.diag([1.5, 2.0, 3.0, 1.0]))
    assert image.header.get_zooms()[:3] == pytest.approx((1.5, 2.0, 3.0))


def test_save_nifti_default_spacing_is_one_millimetre(tmp_path):
    image = nib.load(str(save_nifti(np.zeros((1, 3, 3, 3), np.float32), tmp_path / "a.nii.gz")))
    np.testing.assert_allclose(image.affine, np.eye(4))


def test_save_nifti_keeps_a_provided_affine(tmp_path):
    affine = np.array(
        [[-0.9, 0.0, 0.1, 90.0], [0.0, 1.1, 0.0, -126.0], [0.0, 0.0, 1.2, -72.0], [0.0, 0.0, 0.0, 1.0]]
    )
    image = nib.load(str(save_nifti(np.ones((1, 3, 4, 5)), tmp_path / "a.nii.gz", affine=torch.tensor(affine), spacing=(9, 9, 9))))
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)  # spacing is ignored when an affine is given


def test_save_nifti_expands_a_2d_affine(tmp_path):
    affine_2d = np.array([[0.5, 0.0, 10.0], [0.0, 0.7, -20.0], [0.0, 0.0, 1.0]])
    image = nib.load(str(save_nifti(np.ones((1, 3, 4)), tmp_path / "a.nii.gz", affine=affine_2d)))
    expected = np.array([[0.5, 0, 0, 10.0], [0, 0.7, 0, -20.0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-6)


def test_save_nifti_without_channel_keeps_the_spatial_layout(tmp_path):
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    image = nib.load(str(save_nifti(volume, tmp_path / "v.nii.gz", channel_first=False)))
    assert image.shape == (2, 3, 4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume)
    slice_2d = np.arange(6, dtype=np.float32).reshape(2, 3)
    image = nib.load(str(save_nifti(slice_2d, tmp_path / "s.nii.gz", channel_first=False, spacing=(2.0, 3.0))))
    assert image.shape == (2, 3, 1)
    np.testing.assert_allclose(image.affine, np.diag([2.0, 3.0, 1.0, 1.0]))


def test_save_nifti_leaves_only_the_final_file(tmp_path):
    save_nifti(np.zeros((1, 2, 2)), tmp_path / "out" / "a.nii.gz")
    assert os.listdir(tmp_path / "out") == ["a.nii.gz"]


# --- atomic_path -----------------------------------------------------------------------------------------------------


def test_atomic_path_yields_a_hidden_sibling_with_the_same_suffixes_and_renames_it(tmp_path):
    target = tmp_path / "sub" / "result.nii.gz"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent  # same file system, so the rename is atomic
        assert temporary.name.startswith(".result-") and temporary.name.endswith(".nii.gz")
        assert not target.exists()
        temporary.write_text("done")
    assert target.read_text() == "done"
    assert os.listdir(target.parent) == ["result.nii.gz"]


def test_atomic_path_removes_the_temporary_and_keeps_the_target_when_the_block_raises(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old content")
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with atomic_path(target) as temporary:
            temporary.write_text("half written")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old content"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_path_failure_without_previous_target_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "a.png"):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# --- label_map_to_rgb / image_to_uint8 -------------------------------------------------------------------------------


def test_label_map_to_rgb_colours_by_argmax():
    label = torch.zeros(3, 2, 2)
    label[0, 0, 0] = 0.6
    label[1, 0, 0] = 0.4  # background wins
    label[1, 0, 1] = 0.51
    label[2, 0, 1] = 0.49
    label[2, 1, :] = 0.9
    rgb = label_map_to_rgb(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], LABEL_PALETTE[0])
    np.testing.assert_array_equal(rgb[0, 1], LABEL_PALETTE[1])
    np.testing.assert_array_equal(rgb[1, 0], LABEL_PALETTE[2])
    np.testing.assert_array_equal(rgb[1, 1], LABEL_PALETTE[2])


def test_label_map_to_rgb_rejects_more_channels_than_colours():
    with pytest.raises(ValueError, match="the palette has 10 colours but the label map has 11 channels"):
        label_map_to_rgb(np.zeros((11, 2, 2)))
    palette = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)
    with pytest.raises(ValueError, match="the palette has 2 colours but the label map has 3 channels"):
        label_map_to_rgb(np.zeros((3, 2, 2)), palette=palette)


def test_image_to_uint8_scales_min_max_or_the_given_range_to_grey_rgb():
    image = np.array([[[0.0, 0.5], [1.0, 2.0]]])  # [1, H, W]
    out = image_to_uint8(image)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[0, 64], [128, 255]])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    np.testing.assert_array_equal(image_to_uint8(image[0], value_range=(0.0, 1.0))[..., 0], [[0, 128], [255, 255]])


# --- save_png_grid ---------------------------------------------------------------------------------------------------


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def test_png_grid_of_images_has_the_expected_size(tmp_path):
    # tiles [C, H=6, W=4] are shown rotated (W rows x H columns); 3 tiles, 2 columns -> 2 x 2 grid with 2 px borders
    items = [torch.rand(1, 6, 4) for _ in range(3)]
    pixels = _png(save_png_grid(items, tmp_path / "grid.png", kind="image", ncols=2, upscale=2))
    assert pixels.shape == (2 * (4 + 2) * 2, 2 * (6 + 2) * 2, 3)
    assert os.listdir(tmp_path) == ["grid.png"]


def test_png_grid_of_labels_has_the_expected_size_and_colours(tmp_path):
    label = torch.zeros(3, 5, 7)
    label[2] = 1.0  # every voxel is class 2
    pixels = _png(save_png_grid([label], tmp_path / "labels.png", kind="label", upscale=1))
    assert pixels.shape == (7 + 2, 5 + 2, 3)  # ncols is capped at the number of items
    assert (pixels[:7, :5] == LABEL_PALETTE[2]).all()
    assert (pixels[7:] == 0).all() and (pixels[:, 5:] == 0).all()  # the black border


def test_png_grid_shows_x_along_columns_and_y_upwards(tmp_path):
    label = torch.zeros(2, 3, 2)  # [C, x=3, y=2]
    label[0] = 1.0
    label[:, 0, 0] = torch.tensor([0.0, 1.0])  # class 1 at x=0, y=0
    pixels = _png(save_png_grid([label], tmp_path / "o.png", kind="label", upscale=1))
    coloured = np.argwhere((pixels == LABEL_PALETTE[1]).all(-1))
    assert coloured.tolist() == [[1, 0]]  # bottom row (y=0) of the 2-row tile, first column (x=0)


def test_png_grid_uses_the_middle_slice_of_3d_inputs(tmp_path):
    label = torch.zeros(3, 4, 4, 5)
    label[0] = 1.0
    label[:, :, :, 2] = torch.tensor([0.0, 0.0, 1.0]).reshape(3, 1, 1)  # only the middle slice (5 // 2) is class 2
    pixels = _png(save_png_grid([label], tmp_path / "mid.png", kind="label", upscale=3))
    assert pixels.shape == ((4 + 2) * 3, (4 + 2) * 3, 3)
    assert (pixels[: 4 * 3, : 4 * 3] == LABEL_PALETTE[2]).all()

    image = torch.zeros(1, 4, 4, 5)
    image[0, :, :, 2] = torch.arange(16.0).reshape(4, 4)  # other slices are constant: they would render black
    grey = _png(save_png_grid([image], tmp_path / "img.png", kind="image", upscale=1))[:4, :4, 0]
    expected = image_to_uint8(np.rot90(image[0, :, :, 2].numpy()))[..., 0]
    np.testing.assert_array_equal(grey, expected)
    assert grey.max() == 255


def test_png_grid_of_nothing_raises(tmp_path):
    with pytest.raises(ValueError, match="save_png_grid needs at least one item"):
        save_png_grid([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


# --- JSON ------------------------------------------------------------------------------------------------------------


def test_write_json_and_read_json_round_trip(tmp_path):
    content = {"fid": 12.5, "classes": ["background", "wm"], "nested": {"n": 3, "ok": True, "none": None}}
    path = write_json(content, tmp_path / "results" / "metrics.json")
    assert path == tmp_path / "results" / "metrics.json"
    assert read_json(path) == content
    assert path.read_text().startswith('{\n  "fid"')  # indented for a person to read
    assert os.listdir(path.parent) == ["metrics.json"]


def test_read_json_of_missing_file_names_what_was_expected(tmp_path):
    missing = tmp_path / "label_statistics.json"
    with pytest.raises(FileNotFoundError) as info:
        read_json(missing, what="label statistics (run the statistics workflow first)")
    assert str(info.value) == f"label statistics (run the statistics workflow first) not found at '{missing}'."
