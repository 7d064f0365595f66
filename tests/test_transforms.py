"""Tests of medgen_common.transforms: probabilistic label maps, divisible shapes, intensity normalisation,
lesion-size conditions, input validation and safe loading. Each test checks values, not only that a transform runs."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medgen_common.transforms import (
    DivisiblePadOrCropd,
    LesionSizeConditiond,
    ModalityNormalised,
    NormaliseProbabilitiesd,
    ProbabilitiesToOneHotd,
    ImageFileError,
    SafeLoadImaged,
    ValidateImaged,
    divisible_shape,
    normalise_probabilities,
    one_hot_to_probabilities,
    probabilities_to_one_hot,
)


def _random_label(channels: int = 4, spatial=(6, 5, 3), seed: int = 0) -> torch.Tensor:
    """A noisy, unnormalised map with negatives and values above 1, ``[C, *spatial]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(channels, *spatial, generator=generator) * 1.6 - 0.3


# --- normalise_probabilities -----------------------------------------------------------------------------------------


def test_normalised_channels_sum_to_one_and_lie_in_unit_interval():
    label = _random_label()
    out = normalise_probabilities(label)
    assert out.shape == label.shape
    assert out.dtype == torch.float32
    assert torch.allclose(out.sum(0), torch.ones(label.shape[1:]), atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_normalise_probabilities_does_not_modify_its_input():
    label = _random_label()
    before = label.clone()
    normalise_probabilities(label)
    assert torch.equal(label, before)


def test_background_is_recomputed_from_the_other_channels():
    # one voxel: given background 0.9 is ignored, foreground 0.3 + 0.2 -> background 0.5
    label = torch.tensor([0.9, 0.3, 0.2]).reshape(3, 1, 1)
    out = normalise_probabilities(label)
    assert torch.allclose(out.flatten(), torch.tensor([0.5, 0.3, 0.2]), atol=1e-6)


def test_negatives_and_values_above_one_are_clipped_before_normalising():
    # foreground 1.7 -> 1 and 0.5; -0.4 -> 0; background = max(1 - 1.5, 0) = 0; renormalised by 1.5
    label = torch.tensor([0.2, 1.7, 0.5, -0.4]).reshape(4, 1, 1, 1)
    out = normalise_probabilities(label)
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 2 / 3, 1 / 3, 0.0]), atol=1e-6)


def test_without_background_recomputation_channels_are_only_rescaled():
    label = torch.tensor([0.2, 0.2, 0.4]).reshape(3, 1, 1)
    out = normalise_probabilities(label, recompute_background=False)
    assert torch.allclose(out.flatten(), torch.tensor([0.25, 0.25, 0.5]), atol=1e-6)


def test_voxels_without_mass_become_background():
    label = torch.zeros(3, 2, 2)
    label[1, 0, 0] = 0.4
    label[2, 0, 0] = 0.4
    label[:, 1, 1] = torch.tensor([-0.5, -1.0, 0.0])  # no mass after clipping
    out = normalise_probabilities(label, recompute_background=False)
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.0, 0.5, 0.5]))
    for index in [(0, 1), (1, 0), (1, 1)]:
        assert torch.equal(out[(slice(None), *index)], torch.tensor([1.0, 0.0, 0.0]))


def test_all_zero_foreground_gives_pure_background_with_recomputation():
    out = normalise_probabilities(torch.zeros(3, 4, 4))
    assert torch.equal(out[0], torch.ones(4, 4))
    assert torch.equal(out[1:], torch.zeros(2, 4, 4))


# --- one-hot conversions ---------------------------------------------------------------------------------------------


def test_probabilities_to_one_hot_marks_the_argmax_with_same_shape_and_dtype():
    label = normalise_probabilities(_random_label(seed=3))
    out = probabilities_to_one_hot(label)
    assert out.shape == label.shape and out.dtype == label.dtype
    assert torch.equal(out.sum(0), torch.ones(label.shape[1:]))
    assert torch.equal(out.argmax(0), label.argmax(0))
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_probabilities_to_one_hot_along_a_batch_channel_dim():
    label = torch.tensor([[[0.1, 0.7], [0.6, 0.2], [0.3, 0.1]]])  # [B=1, C=3, N=2]
    out = probabilities_to_one_hot(label, dim=1)
    assert torch.equal(out, torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]))


def test_probabilities_to_one_hot_dict_transform():
    label = torch.tensor([0.2, 0.5, 0.3]).reshape(3, 1, 1)
    out = ProbabilitiesToOneHotd("label")({"label": label, "image": torch.ones(1)})
    assert torch.equal(out["label"].flatten(), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(out["image"], torch.ones(1))


def _half_plane_one_hot(size: int = 16) -> torch.Tensor:
    one_hot = torch.zeros(2, size, size, dtype=torch.uint8)
    one_hot[0, : size // 2] = 1
    one_hot[1, size // 2 :] = 1
    return one_hot


def test_one_hot_to_probabilities_with_sigma_zero_is_the_identity_as_float():
    one_hot = _half_plane_one_hot()
    out = one_hot_to_probabilities(one_hot, sigma=0.0)
    assert out.dtype == torch.float32
    assert torch.equal(out, one_hot.float())


def test_one_hot_to_probabilities_with_sigma_is_normalised_and_soft_at_edges():
    one_hot = _half_plane_one_hot(16)
    out = one_hot_to_probabilities(one_hot, sigma=1.0)
    assert out.shape == one_hot.shape
    assert torch.allclose(out.sum(0), torch.ones(16, 16), atol=1e-6)
    # rows 7 and 8 sit either side of the class boundary: soft, yet still on the right side
    assert 0.5 < out[0, 7, 5] < 0.95 and 0.5 < out[1, 8, 5] < 0.95
    # far from the boundary the map stays (almost) hard
    assert out[0, 0, 5] > 0.999 and out[1, 15, 5] > 0.999
    assert torch.equal(probabilities_to_one_hot(out), one_hot.float())


# --- divisible_shape -------------------------------------------------------------------------------------------------


def test_divisible_shape_pad_rounds_up_to_multiples():
    assert divisible_shape((5, 6, 8), 4) == (8, 8, 8)
    assert divisible_shape((5, 5), (2, 4), method="pad") == (6, 8)


def test_divisible_shape_crop_rounds_down_to_multiples():
    assert divisible_shape((5, 6, 9), 4, method="crop") == (4, 4, 8)
    assert divisible_shape((7, 9), (3, 2), method="crop") == (6, 8)


def test_divisible_shape_rejects_k_of_wrong_length():
    with pytest.raises(ValueError, match=r"k has 3 entries but the shape \(5, 6\) has 2"):
        divisible_shape((5, 6), (2, 2, 2))


def test_divisible_shape_crop_refuses_a_zero_size():
    with pytest.raises(ValueError, match=r"cannot crop \(3, 8\) to a multiple of \[4, 4\]: a size would be 0"):
        divisible_shape((3, 8), 4, method="crop")


def test_divisible_shape_rejects_unknown_method():
    with pytest.raises(ValueError, match="method must be 'pad' or 'crop', got 'resize'"):
        divisible_shape((4, 4), 2, method="resize")


# --- DivisiblePadOrCropd ---------------------------------------------------------------------------------------------


def test_divisible_pad_pads_symmetrically_with_zeros():
    image = torch.arange(1.0, 31.0).reshape(1, 5, 6)
    out = DivisiblePadOrCropd("image", k=4)({"image": image})["image"]
    assert out.shape == (1, 8, 8)
    # 5 -> 8: one row before, two after; 6 -> 8: one column either side
    assert torch.equal(out[:, 1:6, 1:7], image)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[1:6, 1:7] = False
    assert torch.equal(out[0][mask], torch.zeros(int(mask.sum())))


def test_divisible_crop_centre_crops():
    image = torch.arange(100.0).reshape(1, 10, 10)
    out = DivisiblePadOrCropd("image", k=(4, 3), method="crop")({"image": image})["image"]
    assert out.shape == (1, 8, 9)
    # 10 -> 8 drops one row either side; 10 -> 9 drops the first column (MONAI's centre: start = 10 // 2 - 9 // 2)
    assert torch.equal(out, image[:, 1:9, 1:10])


def test_divisible_pad_fills_label_background_with_one_so_maps_still_sum_to_one():
    label = normalise_probabilities(_random_label(channels=3, spatial=(5, 6, 3), seed=1))
    data = {"label": label, "plain": label.clone()}
    out = DivisiblePadOrCropd(["label", "plain"], k=4, background_fill_keys="label")(data)
    padded = out["label"]
    assert padded.shape == (3, 8, 8, 4)
    assert torch.allclose(padded.sum(0), torch.ones(8, 8, 4), atol=1e-6)
    assert torch.equal(padded[:, 1:6, 1:7, 0:3], label)  # original voxels unchanged
    assert torch.equal(padded[0, 0], torch.ones(8, 4)) and torch.equal(padded[1:, 0], torch.zeros(2, 8, 4))
    # a key not named in background_fill_keys is padded with zeros in every channel
    assert torch.equal(out["plain"][:, 0], torch.zeros(3, 8, 4))
    assert torch.equal(out["plain"][:, 1:6, 1:7, 0:3], label)


def test_divisible_crop_leaves_label_values_alone():
    label = normalise_probabilities(_random_label(channels=2, spatial=(9, 8), seed=2))
    out = DivisiblePadOrCropd("label", k=4, method="crop", background_fill_keys=["label"])({"label": label})
    assert out["label"].shape == (2, 8, 8)
    assert torch.equal(out["label"], label[:, 0:8, :])


def test_divisible_pad_or_crop_validates_method_at_construction():
    with pytest.raises(ValueError, match="method must be 'pad' or 'crop'"):
        DivisiblePadOrCropd("image", k=4, method="reflect")


# --- NormaliseProbabilitiesd -----------------------------------------------------------------------------------------


def test_normalise_probabilities_dict_keeps_meta_tensor_affine_and_meta():
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    label = MetaTensor(_random_label(), affine=affine, meta={"filename_or_obj": "sub-01_label.nii.gz"})
    out = NormaliseProbabilitiesd("label")({"label": label})["label"]
    assert isinstance(out, MetaTensor)
    assert torch.equal(out.affine.float(), affine)
    assert out.meta["filename_or_obj"] == "sub-01_label.nii.gz"
    assert torch.allclose(out.as_tensor(), normalise_probabilities(label.as_tensor()))


def test_normalise_probabilities_dict_on_plain_tensor_returns_plain_tensor():
    out = NormaliseProbabilitiesd("label", recompute_background=False)({"label": torch.full((2, 3), 0.3)})["label"]
    assert not isinstance(out, MetaTensor)
    assert torch.allclose(out, torch.full((2, 3), 0.5))


# --- ModalityNormalised ----------------------------------------------------------------------------------------------


def test_mri_scales_percentiles_of_nonzero_voxels_to_unit_range_and_zeros_stay_zero():
    image = torch.zeros(1, 20, 100)
    image[0, :10] = torch.arange(1.0, 1001.0).reshape(10, 100)
    out = ModalityNormalised("image", modality="mri")({"image": image})["image"]
    high = float(torch.quantile(torch.arange(1.0, 1001.0), 0.995))
    assert high == pytest.approx(995.005)
    assert torch.equal(out[0, 10:], torch.zeros(10, 100))
    assert torch.allclose(out[0, :10], torch.clamp(image[0, :10] / high, 0, 1))
    assert out.max() == 1.0 and out.min() == 0.0


def test_mri_percentiles_ignore_the_zero_background():
    foreground = torch.arange(1.0, 201.0).reshape(1, 10, 20)
    with_background = torch.zeros(1, 10, 200)
    with_background[:, :, :20] = foreground
    transform = ModalityNormalised("image", modality="mri", upper=90.0)
    small = transform({"image": foreground})["image"]
    large = transform({"image": with_background})["image"]
    assert torch.allclose(large[:, :, :20], small)
    assert small.max() == 1.0 and 0 < small.min() < 0.01


def test_mri_lower_percentile_maps_to_zero():
    image = torch.arange(0.0, 101.0).reshape(1, 101)  # one zero voxel, then 1..100
    out = ModalityNormalised("image", modality="mri", lower=10.0, upper=100.0)({"image": image})["image"]
    low = 1 + 0.1 * 99  # 10th percentile of 1..100
    assert torch.allclose(out, torch.clamp((image - low) / (100 - low), 0, 1))
    assert out[0, 0] == 0.0


def test_mri_all_zero_image_stays_zero():
    out = ModalityNormalised("image")({"image": torch.zeros(1, 4, 4)})["image"]
    assert torch.equal(out, torch.zeros(1, 4, 4))


def test_ct_window_maps_hounsfield_units_to_unit_range():
    image = torch.tensor([[-3000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]])
    out = ModalityNormalised("ct", modality="ct")({"ct": image})["ct"]
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]]))
    narrow = ModalityNormalised("ct", modality="ct", window=(-100, 300))({"ct": image})["ct"]
    assert torch.allclose(narrow, torch.tensor([[0.0, 0.0, 0.25, 1.0, 1.0, 1.0]]))


def test_ultrasound_divides_grey_levels_by_255():
    image = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    out = ModalityNormalised("us", modality="ultrasound")({"us": image})["us"]
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[0.0, 0.2, 1.0]]))


def test_invalid_modality_is_rejected():
    with pytest.raises(ValueError, match="modality must be 'mri', 'ct' or 'ultrasound', got 'pet'"):
        ModalityNormalised("image", modality="pet")


# --- LesionSizeConditiond --------------------------------------------------------------------------------------------


def _lesion_label() -> torch.Tensor:
    label = torch.zeros(4, 4, 4)  # background, wmh, tumour, oedema
    label[1, 0, :2] = 1.0  # wmh: 2 voxels
    label[1, 1, 0] = 0.5  # + half a voxel
    label[2, 2, :] = 1.0  # tumour: 4 voxels
    label[3, 3, 0] = 0.25  # oedema: a quarter voxel
    label[0] = 1.0 - label[1:].sum(0)
    return label


def test_lesion_size_condition_is_soft_volume_over_dataset_max():
    transform = LesionSizeConditiond("label", lesion_channel_indices=[1, 2, 3], max_volume=[5.0, 8.0, 1.0])
    out = transform({"label": _lesion_label()})
    condition = out["lesion_size_condition"]
    assert condition.shape == (1, 3)
    assert condition.dtype == torch.float32
    assert torch.allclose(condition, torch.tensor([[2.5 / 5.0, 4.0 / 8.0, 0.25]]))
    assert "label" in out


def test_lesion_size_condition_follows_the_given_channel_order_and_output_key():
    transform = LesionSizeConditiond("seg", [3, 1], [1.0, 5.0], output_key="context")
    out = transform({"seg": MetaTensor(_lesion_label())})
    assert torch.allclose(out["context"], torch.tensor([[0.25, 0.5]]))


def test_lesion_size_condition_is_clamped_to_one():
    transform = LesionSizeConditiond("label", [2], [2.0])  # 4 voxels against a maximum of 2
    assert torch.equal(transform({"label": _lesion_label()})["lesion_size_condition"], torch.tensor([[1.0]]))


def test_lesion_with_zero_max_volume_always_gives_zero():
    transform = LesionSizeConditiond("label", [1, 2], [0.0, 8.0])
    condition = transform({"label": _lesion_label()})["lesion_size_condition"]
    assert torch.equal(condition[0, 0], torch.tensor(0.0))  # the wmh volume 2.5 is ignored
    assert condition[0, 1] == pytest.approx(0.5)


def test_lesion_size_condition_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 lesion channels but 3 max volumes were given"):
        LesionSizeConditiond("label", [1, 2], [1.0, 2.0, 3.0])


def test_lesion_size_condition_rejects_a_channel_beyond_the_label_map():
    transform = LesionSizeConditiond("label", [1, 4], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"lesion channels \[1, 4\] do not exist in a label map with 4 channels"):
        transform({"label": _lesion_label()})


def test_lesion_size_condition_rejects_negative_channel_indices():
    with pytest.raises(ValueError, match=r"lesion channel indices must be >= 0, got \[1, -7\]"):
        LesionSizeConditiond("label", [1, -7], [1.0, 1.0])


# --- ValidateImaged -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_validate_refuses_nonfinite_naming_key_and_source_file(bad):
    image = torch.zeros(1, 3, 3)
    image[0, 1, 2] = bad
    data = {"image": MetaTensor(image, meta={"filename_or_obj": "/data/sub-07_T1w.nii.gz"})}
    with pytest.raises(ImageFileError) as info:
        ValidateImaged("image")(data)
    assert str(info.value) == "'image' from '/data/sub-07_T1w.nii.gz' contains NaN or Inf values."


def test_validate_on_plain_arrays_says_in_memory():
    with pytest.raises(ValueError, match="'label' from '<in memory>' contains NaN or Inf values"):
        ValidateImaged(["image", "label"])({"image": np.zeros(3), "label": np.array([0.0, np.nan])})


def test_validate_passes_good_data_unchanged():
    image = MetaTensor(torch.rand(1, 4, 4), meta={"filename_or_obj": "a.nii.gz"})
    data = {"image": image, "other": torch.tensor([float("nan")])}  # unchecked key
    out = ValidateImaged("image", spatial_dims=2, channels=1)(data)
    assert out == data and out is not data
    assert out["image"] is image


def test_validate_refuses_a_wrong_number_of_spatial_dimensions():
    volume = MetaTensor(torch.rand(4, 8, 8, 5), meta={"filename_or_obj": "sub-01_label.nii.gz"})
    with pytest.raises(ValueError) as info:
        ValidateImaged("label", spatial_dims=2)({"label": volume})
    assert str(info.value) == (
        "'label' from 'sub-01_label.nii.gz' has shape (4, 8, 8, 5); this model needs a channel-first 2D image [C, H, W]."
    )


def test_validate_refuses_a_wrong_channel_count_naming_the_classes():
    label = MetaTensor(torch.rand(3, 8, 8), meta={"filename_or_obj": "x.nii.gz"})
    with pytest.raises(ValueError) as info:
        ValidateImaged("label", channel_names=["background", "csf", "gm", "wm"])({"label": label})
    assert str(info.value) == (
        "'label' from 'x.nii.gz' has 3 channel(s) (shape (3, 8, 8)); this model needs 4 (background, csf, gm, wm)."
    )


def test_validate_probabilities_accepts_soft_and_one_hot_maps():
    soft = normalise_probabilities(_random_label())
    one_hot = probabilities_to_one_hot(soft)
    for label in (soft, one_hot):
        ValidateImaged("label", probabilities=True)({"label": label})


@pytest.mark.parametrize(
    "label, values, sums",
    [
        (torch.full((4, 3, 3), 0.5), "[0.5, 0.5]", "[2, 2]"),  # channels sum to 2
        (torch.tensor([[[1.4]], [[-0.4]]]), "[-0.4, 1.4]", "[1, 1]"),  # sums to 1, values leave [0, 1]
    ],
)
def test_validate_probabilities_refuses_maps_that_do_not_sum_to_one(label, values, sums):
    with pytest.raises(ValueError) as info:
        ValidateImaged("label", probabilities=True)({"label": label})
    assert str(info.value).startswith(
        f"'label' from '<in memory>' is not a probabilistic label map: values span {values} and the channel sums "
        f"span {sums}"
    )
    assert "sum to 1 in every voxel" in str(info.value)


# --- SafeLoadImaged --------------------------------------------------------------------------------------------------


@pytest.fixture
def nifti_files(tmp_path):
    """A good NIfTI, a truncated copy, one with a corrupt header and one with a NaN."""
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 4), dtype=np.float32), np.eye(4)), good)
    raw = good.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    header = bytearray(gzip.decompress(raw))
    header[40:56] = b"\xff" * 16  # dim[] and the datatype code
    (tmp_path / "corrupt.nii").write_bytes(bytes(header))
    nan = np.zeros((4, 4, 2), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    return tmp_path


def test_safe_load_reads_a_good_file_like_monai(nifti_files):
    image = SafeLoadImaged("image", image_only=True, ensure_channel_first=True)(
        {"image": str(nifti_files / "good.nii.gz")}
    )
    assert image["image"].shape == (1, 16, 16, 4)
    assert image["image"].meta["filename_or_obj"].endswith("good.nii.gz")


@pytest.mark.parametrize(
    "name, cause",
    [
        ("truncated.nii.gz", "EOFError: Compressed file ended before the end-of-stream marker was reached"),
        ("corrupt.nii", "HeaderDataError"),
        ("missing.nii.gz", "FileNotFoundError"),
    ],
)
def test_safe_load_names_the_file_it_cannot_read(nifti_files, name, cause):
    path = str(nifti_files / name)
    with pytest.raises(ImageFileError) as info:
        SafeLoadImaged(["label", "image"], image_only=True)({"label": str(nifti_files / "good.nii.gz"), "image": path})
    assert str(info.value).startswith(f"'image' file '{path}' cannot be read (missing, truncated or corrupt): {cause}")


def test_safe_load_refuses_nan_at_load_time_with_the_file_name(nifti_files):
    path = str(nifti_files / "nan.nii.gz")
    with pytest.raises(ImageFileError) as info:
        SafeLoadImaged("image", image_only=True)({"image": path})
    assert str(info.value) == f"'image' from '{path}' contains NaN or Inf values."
