"""Tests of medgen_common.segmentation_utility: the loop that asks whether a training set helps a segmenter.

The data are tiny 2D "brains": a disk (background outside) split into three tissues by a smooth random field, with
soft 4-channel labels stored channels last (X x Y x 1 x C) and images whose intensity band gives the tissue.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medgen_common.segmentation_utility import (
    TRADITIONAL_AUGMENTATIONS,
    SliceSegmenter,
    combine_folds,
    compare_training_sets,
    evaluate_segmenter,
    format_summary_table,
    format_table,
    group_by_subject,
    items_for_contrast,
    load_slice,
    merge_label_channels,
    normalise_image,
    predict_subject,
    summarise_comparison,
    traditional_augmentation,
    train_segmenter,
)
from medgen_common.writers import save_nifti

SIZE = 16
CLASS_CHANNELS = [0, 1, 2, 3]
CLASS_NAMES = ["background", "csf", "gm", "wm"]
TISSUES = CLASS_NAMES[1:]
# Tissue levels are uneven so that no tissue z-scores to about 0, the value of the background after z-scoring inside
# the brain (with even levels the middle tissue would look like background voxel by voxel).
MATCHED_MEANS = (0.0, 0.25, 0.5, 1.5)
INVERTED_MEANS = (0.0, 1.5, 0.5, 0.25)  # tissue contrast reversed: a segmenter trained on it learns the wrong order
TRAINING = {"steps": 200, "batch_size": 8, "lr": 3e-3, "seed": 0}
NUM_TRAINING_SLICES = 128  # with a few dozen, the network memorises the training slices instead of their contrast


def _brain_slice(rng: np.random.Generator, class_means: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One slice: image X x Y x 1 (zero outside the disk) and soft label X x Y x 1 x 4 whose argmax is the tissue."""
    x, y = np.mgrid[:SIZE, :SIZE]
    centre, radius = rng.uniform(6.5, 9.5, size=2), rng.uniform(5.5, 7.0)
    brain = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 < radius**2
    field = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), sigma=2.0)
    low, high = np.quantile(field[brain], [1 / 3, 2 / 3])
    classes = np.where(brain, 1 + (field > low) + (field > high), 0)
    label = 0.8 * np.eye(4)[classes] + 0.05  # soft, channels sum to 1, argmax = class
    image = np.asarray(class_means)[classes] + rng.normal(scale=0.05, size=classes.shape) * brain
    return image[:, :, None].astype(np.float32), label[:, :, None, :].astype(np.float32)


def _items(seed: int, count: int, class_means=MATCHED_MEANS, subjects: int = 1) -> list[dict]:
    """In-memory items; ``subjects`` subjects share the ``count`` slices, slice indices counting per subject."""
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        image, label = _brain_slice(rng, class_means)
        subject, slice_index = divmod(index, count // subjects)
        items.append({"image": image, "label": label, "subject": f"sub-{subject:03d}", "slice_index": slice_index})
    return items


def _on_disk(items: list[dict], folder) -> list[dict]:
    """The same items with image and label written as NIfTI files (the demo data's layout)."""
    stored = []
    for item in items:
        stem = folder / f"{item['subject']}_z{item['slice_index']:03d}"
        image_path = save_nifti(item["image"], f"{stem}_t1.nii.gz", channel_first=False)
        label_path = save_nifti(item["label"], f"{stem}_label.nii.gz", channel_first=False)
        stored.append({**item, "image": str(image_path), "label": str(label_path)})
    return stored


@pytest.fixture(scope="module")
def test_items(tmp_path_factory) -> list[dict]:
    """Held-out slices of the matched distribution: 3 subjects of 4 slices, as NIfTI files."""
    return _on_disk(_items(seed=100, count=12, subjects=3), tmp_path_factory.mktemp("test_items"))


@pytest.fixture(scope="module")
def comparison(test_items) -> dict:
    """One segmenter trained on matched images, one on inverted-contrast images, scored on the same test subjects."""
    train_sets = {
        "real": _items(seed=1, count=NUM_TRAINING_SLICES),
        "inverted": _items(seed=2, count=NUM_TRAINING_SLICES, class_means=INVERTED_MEANS),
    }
    return compare_training_sets(
        train_sets, test_items, CLASS_CHANNELS, merge_into=3, class_names=CLASS_NAMES, reference="real", **TRAINING
    )


# --- targets and loading ---------------------------------------------------------------------------------------------


def test_dropped_channels_are_added_to_the_chosen_class():
    label = torch.zeros(5, 1, 3)
    label[:, 0, 0] = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.4])  # a lesion voxel: channel 4 most probable
    label[:, 0, 1] = torch.tensor([0.0, 0.6, 0.2, 0.1, 0.1])
    label[:, 0, 2] = torch.tensor([0.2, 0.0, 0.5, 0.0, 0.3])

    into_wm = merge_label_channels(label, CLASS_CHANNELS, merge_into=3)
    assert into_wm.shape == (4, 1, 3)
    assert torch.allclose(into_wm.sum(0), label.sum(0))
    assert into_wm.argmax(0).flatten().tolist() == [3, 1, 2]

    into_gm = merge_label_channels(label, CLASS_CHANNELS, merge_into={4: 2})
    assert into_gm.argmax(0).flatten().tolist() == [2, 1, 2]
    assert torch.allclose(into_gm[2, 0, 2], torch.tensor(0.8))

    kept_lesion = merge_label_channels(label, [0, 1, 2, 3, 4], merge_into=3)  # nothing dropped
    assert torch.equal(kept_lesion, label)


def test_merge_rules_must_name_kept_channels_and_cover_every_dropped_one():
    label = torch.full((6, 2, 2), 1 / 6)
    with pytest.raises(ValueError, match=r"merge_into must name kept channels.*\[5\]"):
        merge_label_channels(label, CLASS_CHANNELS, merge_into=5)
    with pytest.raises(ValueError, match=r"no kept channel for label channel\(s\) \[5\]"):
        merge_label_channels(label, CLASS_CHANNELS, merge_into={4: 3})
    with pytest.raises(ValueError, match="at least 2 label channels"):
        merge_label_channels(label, [0], merge_into=0)


def test_files_and_arrays_load_alike_with_the_image_z_scored_inside_the_brain(tmp_path):
    (item,) = _items(seed=3, count=1)
    (stored,) = _on_disk([item], tmp_path)
    image, target = load_slice(item, CLASS_CHANNELS, merge_into=3)
    image_from_file, target_from_file = load_slice(stored, CLASS_CHANNELS, merge_into=3)

    assert image.shape == target.shape == (1, SIZE, SIZE)
    assert image.dtype == torch.float32 and target.dtype == torch.int64
    assert torch.allclose(image, image_from_file) and torch.equal(target, target_from_file)
    assert torch.equal(target[0], torch.from_numpy(item["label"][:, :, 0].argmax(-1)))
    brain = torch.from_numpy(item["image"][:, :, 0] != 0)
    assert torch.all(image[0][~brain] == 0)
    assert abs(float(image[0][brain].mean())) < 1e-5 and abs(float(image[0][brain].std(correction=0)) - 1) < 1e-4


# --- class-index labels and images that are not skull-stripped (ultrasound) -----------------------------------------


def _index_label() -> np.ndarray:
    """An 8 x 8 uint8 class-index map holding the values 0 to 4 (the ultrasound demo data's label layout)."""
    return (np.arange(64).reshape(8, 8) % 5).astype(np.uint8)


def test_index_labels_map_kept_values_to_their_class_position_like_the_equivalent_soft_label(tmp_path):
    index_label = _index_label()
    image = np.full((8, 8), 0.5, dtype=np.float32)
    soft = np.eye(5, dtype=np.float32)[index_label]  # the one-hot soft label of the same map, X x Y x 5
    for class_channels, merge_into in (([0, 1, 2, 3], 3), ([0, 2, 1, 3], {4: 2})):
        index_item = {"image": image, "label": index_label}
        _, from_index = load_slice(index_item, class_channels, merge_into, label_format="index")
        _, from_soft = load_slice({"image": image, "label": soft}, class_channels, merge_into)
        assert torch.equal(from_index, from_soft)
    _, reordered = load_slice({"image": image, "label": index_label}, [0, 2, 1, 3], {4: 2}, label_format="index")
    positions = {0: 0, 1: 2, 2: 1, 3: 3, 4: 1}  # value 4 is merged into channel 2, the second class
    assert torch.equal(reordered[0], torch.from_numpy(np.vectorize(positions.get)(index_label)))

    stored = {
        "image": str(save_nifti(image, tmp_path / "image.nii.gz", channel_first=False)),
        "label": str(save_nifti(index_label, tmp_path / "label.nii.gz", channel_first=False)),  # X x Y x 1 uint8
    }
    _, from_file = load_slice(stored, [0, 1, 2, 3, 4], 0, label_format="index")
    assert from_file.dtype == torch.int64 and torch.equal(from_file[0], torch.from_numpy(index_label).long())


def test_index_labels_must_hold_non_negative_integers_with_a_rule_for_every_dropped_value():
    image = np.ones((8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="non-negative integer class indices, found the value 0.5"):
        load_slice({"image": image, "label": _index_label() / 2.0}, [0, 1, 2, 3, 4], 0, label_format="index")
    with pytest.raises(ValueError, match="found the value -1"):
        load_slice({"image": image, "label": -np.ones((8, 8))}, [0, 1], 0, label_format="index")
    with pytest.raises(ValueError, match="no kept channel for label value 4"):
        load_slice({"image": image, "label": _index_label()}, [0, 1, 2], {3: 0}, label_format="index")
    with pytest.raises(ValueError, match=r"a class-index map\? pass label_format='index'"):
        load_slice({"image": image, "label": _index_label()[:, :, None]}, [0, 1, 2, 3, 4], 0)
    with pytest.raises(ValueError, match=r"label_format must be one of \['soft', 'index'\]"):
        load_slice({"image": image, "label": _index_label()}, [0, 1], 0, label_format="indices")


def test_images_can_be_z_scored_over_the_whole_image_or_kept_as_they_are():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, size=(8, 8)).astype(np.float32)
    image[:2] = 0.0  # dark rows (e.g. an acoustic shadow) are tissue, not outside the body
    item = {"image": image, "label": _index_label()}
    whole, _ = load_slice(item, [0, 1, 2, 3, 4], 0, label_format="index", normalisation="zscore")
    assert abs(float(whole.mean())) < 1e-5 and abs(float(whole.std(correction=0)) - 1) < 1e-4
    assert torch.all(whole[0, :2] < 0)  # the dark rows are below the mean, not pinned to 0
    unchanged, _ = load_slice(item, [0, 1, 2, 3, 4], 0, label_format="index", normalisation="none")
    assert torch.equal(unchanged[0], torch.from_numpy(image))
    inside, _ = load_slice(item, [0, 1, 2, 3, 4], 0, label_format="index")  # the default: z-scored inside non-zero
    assert torch.all(inside[0, :2] == 0)
    with pytest.raises(ValueError, match=r"normalisation must be one of \['zscore_nonzero', 'zscore', 'none'\]"):
        normalise_image(image, "minmax")


def _band_item(rng: np.random.Generator, subject: str, slice_index: int) -> dict:
    """16 x 16 ultrasound-like slice, nothing zero: a bright band (class 1) over a dark band (class 2) at a random
    depth in a mid-grey background (class 0); index label X x Y x 1."""
    top = int(rng.integers(2, 8))
    label = np.zeros((16, 16), dtype=np.uint8)
    label[top : top + 3], label[top + 3 : top + 7] = 1, 2
    image = np.array([0.45, 0.9, 0.1])[label] + rng.normal(scale=0.05, size=label.shape)
    image = image.astype(np.float32)
    return {"image": image, "label": label[:, :, None], "subject": subject, "slice_index": slice_index}


def test_a_segmenter_learns_index_labelled_images_that_are_not_skull_stripped():
    rng = np.random.default_rng(0)
    training = [_band_item(rng, "train", index) for index in range(32)]
    test = [_band_item(rng, f"test-{index // 2}", index % 2) for index in range(4)]
    formats = {"label_format": "index", "normalisation": "zscore"}
    network = train_segmenter(training, [0, 1, 2], 0, steps=60, batch_size=8, lr=1e-2, channels=(4, 8), **formats)
    scores = evaluate_segmenter(network, test, [0, 1, 2], 0, class_names=["background", "bright", "dark"], **formats)
    assert scores["mean"]["bright"] > 0.95 and scores["mean"]["dark"] > 0.95, scores["mean"]  # 2 steps: about 0.8


# --- 3D reassembly ---------------------------------------------------------------------------------------------------


class NonZeroIsForeground(torch.nn.Module):
    """A perfect segmenter for the square phantoms below: class 1 wherever the z-scored image is non-zero."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # gives the network a device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        foreground = (images != 0).float()
        return torch.cat([1 - foreground, foreground], dim=1)


def _square_item(subject: str, slice_index: int, side: int) -> dict:
    """A slice whose foreground is a ``side`` x ``side`` square (checkerboard of 1 and 2, so z-scoring keeps it)."""
    x, y = np.mgrid[:8, :8]
    inside = (x < side) & (y < side)
    image = np.where(inside, 1.0 + (x + y) % 2, 0.0)
    label = np.stack([~inside, inside], axis=-1).astype(np.float32)
    return {"image": image, "label": label, "subject": subject, "slice_index": slice_index}


def test_slices_are_stacked_into_a_volume_in_slice_index_order():
    side_by_slice = {7: 6, 2: 2, 5: 4}
    items = [_square_item("sub-a", index, side) for index, side in side_by_slice.items()]  # given out of order
    prediction, target = predict_subject(NonZeroIsForeground(), items, [0, 1], merge_into=0)

    assert prediction.shape == target.shape == (8, 8, 3)
    assert target.sum(dim=(0, 1)).tolist() == [4, 16, 36]  # sides 2, 4, 6 for slices 2, 5, 7
    assert torch.equal(prediction, target)


def test_evaluation_groups_flat_items_by_subject_and_scores_in_3d():
    items = [_square_item("sub-b", 3, 5), _square_item("sub-a", 1, 3), _square_item("sub-b", 0, 2)]
    scores = evaluate_segmenter(NonZeroIsForeground(), items, [0, 1], merge_into=0, class_names=["bg", "fg"])
    assert scores["per_subject"] == {"sub-b": {"fg": 1.0}, "sub-a": {"fg": 1.0}}
    assert scores["mean"] == {"fg": 1.0}
    with_background = evaluate_segmenter(NonZeroIsForeground(), items, [0, 1], merge_into=0, include_background=True)
    assert with_background["mean"] == {"class_0": 1.0, "class_1": 1.0}

    assert list(group_by_subject(items)) == ["sub-b", "sub-a"]
    assert scores["mean_hd95"] == {"fg": 0.0} and scores["mean_assd"] == {"fg": 0.0}  # perfect: no surface distance


def test_per_image_scores_average_the_2d_images_of_a_subject_instead_of_pooling_them():
    """Two frames of one subject: the label of the second marks only the 2 x 2 corner of its 6 x 6 square. Pooled in
    3D, Dice is 2 * 40 / (72 + 40); per image it is the mean of 1 and 2 * 4 / (36 + 4)."""
    perfect, partial = _square_item("sub-a", 0, 6), _square_item("sub-a", 1, 6)
    x, y = np.mgrid[:8, :8]
    corner = (x < 2) & (y < 2)
    partial["label"] = np.stack([~corner, corner], axis=-1).astype(np.float32)
    settings = {"class_channels": [0, 1], "merge_into": 0, "class_names": ["bg", "fg"]}
    pooled = evaluate_segmenter(NonZeroIsForeground(), [perfect, partial], **settings)
    per_image = evaluate_segmenter(NonZeroIsForeground(), [perfect, partial], per_image=True, **settings)
    assert pooled["mean"]["fg"] == pytest.approx(80 / 112)
    assert per_image["mean"]["fg"] == pytest.approx((1 + 8 / 40) / 2)
    assert (
        per_image["mean_hd95"]["fg"] > 0
        and per_image["per_subject_hd95"]["sub-a"]["fg"] == per_image["mean_hd95"]["fg"]
    )


# --- the comparison: useful and useless training data ----------------------------------------------------------------


def test_training_on_matched_data_segments_held_out_subjects(comparison):
    assert comparison["reference"] == "real"
    assert set(comparison["per_subject"]["real"]) == {"sub-000", "sub-001", "sub-002"}
    for tissue in TISSUES:
        assert comparison["mean_dice"]["real"][tissue] > 0.8, comparison["mean_dice"]["real"]
        assert comparison["ratio_to_reference"]["real"][tissue] == pytest.approx(1.0)
    assert "background" not in comparison["mean_dice"]["real"]


def test_training_on_inverted_contrast_scores_much_lower(comparison):
    inverted, ratios = comparison["mean_dice"]["inverted"], comparison["ratio_to_reference"]["inverted"]
    # the outer tissues swap places; only the middle band keeps its label
    assert inverted["csf"] < 0.3 and inverted["wm"] < 0.3, inverted
    assert sum(ratios.values()) / len(ratios) < 0.6, ratios
    for tissue in TISSUES:
        assert ratios[tissue] == pytest.approx(inverted[tissue] / comparison["mean_dice"]["real"][tissue])


def test_surface_distances_and_patient_level_intervals_rank_the_sets(comparison):
    ci, surface = comparison["confidence_intervals"], comparison["per_subject_metrics"]
    assert set(surface["real"]["hd95"]) == {"sub-000", "sub-001", "sub-002"}
    for tissue in TISSUES:
        real, inverted = ci["real"]["dice"][tissue], ci["inverted"]["dice"][tissue]
        assert real["n"] == 3 and real["low"] <= comparison["mean_dice"]["real"][tissue] <= real["high"]
        assert ci["real"]["hd95"][tissue]["mean"] <= ci["inverted"]["hd95"][tissue]["mean"]
        assert ci["real"]["assd"][tissue]["mean"] <= ci["inverted"]["assd"][tissue]["mean"]
    difference = comparison["dice_difference_to_reference"]
    assert list(difference) == ["inverted"]
    assert difference["inverted"]["csf"]["high"] < 0  # worse on every test subject


def test_table_lists_each_training_set_with_dice_and_ratio(comparison):
    table = format_table(comparison)
    lines = table.splitlines()
    assert "ratio to 'real'" in lines[0]
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["training set", "items", *TISSUES]
    real_row = [cell.strip() for cell in lines[4].strip("|").split("|")]
    assert real_row[:2] == ["real", str(NUM_TRAINING_SLICES)]
    assert real_row[2] == f"{comparison['mean_dice']['real']['csf']:.3f} (1.00)"
    assert lines[5].startswith("| inverted")


def test_summary_table_gives_class_mean_dice_surface_distances_and_the_paired_difference(comparison):
    lines = format_summary_table(comparison).splitlines()
    assert "3 test subjects" in lines[0]
    real, inverted = ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:6])
    mean_dice = np.mean([comparison["mean_dice"]["real"][t] for t in TISSUES])
    assert real[:2] == ["real", str(NUM_TRAINING_SLICES)] and real[2].startswith(f"{mean_dice:.3f} [")
    assert real[3] == "–" and inverted[0] == "inverted"
    delta, low, high = (float(v) for v in inverted[3].replace("[", "").replace("]", "").replace(",", "").split())
    assert delta < 0 and low <= delta <= high and high < 0  # the inverted set is worse on every subject
    assert float(inverted[6].split()[0]) > float(real[6].split()[0])  # and its surfaces (HD95) are further off


# --- determinism -----------------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_segmenter_and_leaves_the_global_random_state_alone():
    items = _items(seed=4, count=8)
    settings = {"steps": 15, "batch_size": 4, "lr": 3e-3}
    global_state = torch.random.get_rng_state()
    first = train_segmenter(items, CLASS_CHANNELS, merge_into=3, seed=7, **settings)
    assert torch.equal(torch.random.get_rng_state(), global_state)
    torch.manual_seed(123)  # the global state must not matter
    second = train_segmenter(items, CLASS_CHANNELS, merge_into=3, seed=7, **settings)
    other_seed = train_segmenter(items, CLASS_CHANNELS, merge_into=3, seed=8, **settings)

    assert isinstance(first, SliceSegmenter) and not first.training
    for name, weight in first.state_dict().items():
        assert torch.equal(weight, second.state_dict()[name]), name
    assert any(not torch.equal(w, other_seed.state_dict()[n]) for n, w in first.state_dict().items())


def test_segmenter_takes_slices_not_divisible_by_its_downsampling():
    network = SliceSegmenter(num_classes=3, channels=(4, 8, 16))
    assert network(torch.randn(2, 1, 13, 7)).shape == (2, 3, 13, 7)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_empty_training_sets_are_refused_by_name(test_items):
    with pytest.raises(ValueError, match="training set is empty"):
        train_segmenter([], CLASS_CHANNELS, merge_into=3)
    with pytest.raises(ValueError, match="training set 'synthetic' is empty"):
        compare_training_sets({"real": _items(5, 2), "synthetic": []}, test_items, CLASS_CHANNELS, merge_into=3)
    with pytest.raises(ValueError, match=r"reference training set 'real' is not among.*\['synthetic'\]"):
        compare_training_sets({"synthetic": _items(5, 2)}, test_items, CLASS_CHANNELS, merge_into=3)


def test_items_missing_image_or_label_are_named():
    items = _items(seed=6, count=3)
    del items[2]["label"]
    expected = r"training set item 2 \(subject 'sub-000', slice 2\) misses key\(s\) \['label'\]"
    with pytest.raises(ValueError, match=expected):
        train_segmenter(items, CLASS_CHANNELS, merge_into=3, steps=1)
    with pytest.raises(ValueError, match=r"misses key\(s\) \['image'\]"):
        load_slice({"label": items[0]["label"]}, CLASS_CHANNELS, merge_into=3)


def test_labels_with_fewer_channels_than_the_classes_are_refused(tmp_path):
    (item,) = _on_disk(_items(seed=7, count=1), tmp_path)
    expected = r"_label\.nii\.gz.*has 4 channels.*fewer than class_channels \[0, 1, 2, 3, 5\]"
    with pytest.raises(ValueError, match=expected):
        load_slice({"image": item["image"], "label": item["label"]}, [0, 1, 2, 3, 5], merge_into=3)


def test_nan_in_an_image_or_label_names_the_item(tmp_path):
    items = _items(seed=8, count=3)
    items[1]["image"][4, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"item 1 \(subject 'sub-000', slice 1\): the image contains NaN"):
        train_segmenter(items, CLASS_CHANNELS, merge_into=3, steps=1)
    (bad_label,) = _items(seed=9, count=1)
    bad_label["label"][0, 0, 0, 2] = np.nan
    (stored,) = _on_disk([bad_label], tmp_path)
    expected = r"test item \(subject 'sub-000', slice 0\): 'label' from '.*sub-000_z000_label\.nii\.gz' contains NaN"
    with pytest.raises(ValueError, match=expected):
        evaluate_segmenter(NonZeroIsForeground(), [stored], CLASS_CHANNELS, merge_into=3)


def test_subjects_need_distinct_slice_indices_to_be_stacked():
    repeated = [_square_item("sub-a", 1, 2), _square_item("sub-a", 1, 3)]
    with pytest.raises(ValueError, match=r"sub-a' has several slices with slice_index \[1\]"):
        predict_subject(NonZeroIsForeground(), repeated, [0, 1], merge_into=0)
    no_index = {"image": np.ones((8, 8)), "label": np.ones((8, 8, 2)), "subject": "sub-a"}
    unindexed = [_square_item("sub-a", 1, 2), no_index]
    with pytest.raises(ValueError, match=r"item\(s\) \[1\] have no 'slice_index'"):
        evaluate_segmenter(NonZeroIsForeground(), unindexed, [0, 1], merge_into=0)


def test_contrast_items_take_the_image_from_the_named_contrast():
    entries = [{"label": "a_label.nii.gz", "t1": "a_t1.nii.gz", "t2": "a_t2.nii.gz", "subject": "a", "slice_index": 3}]
    (item,) = items_for_contrast(entries, "t2")
    assert item["image"] == "a_t2.nii.gz" and item["label"] == "a_label.nii.gz" and item["slice_index"] == 3
    with pytest.raises(ValueError, match=r"entry 0 has no 'flair' image"):
        items_for_contrast(entries, "flair")


# --- patch mixing ----------------------------------------------------------------------------------------------------


class RecordingSegmenter(SliceSegmenter):
    """The default segmenter, keeping every training input it is given."""

    def __init__(self):
        super().__init__(num_classes=2, channels=(4, 8))
        self.inputs = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.detach().clone())
        return super().forward(images)


def test_patch_mixing_trains_on_real_and_synthetic_patches_of_the_same_slice():
    """Real slices are 0, their synthetic counterparts 1 (2 and 3 for the second item's two): every training input
    is block-constant on 4 x 4 patches, real with probability alpha, and only an item's own counterparts appear."""
    label = np.zeros((16, 16, 1), dtype=np.uint8)
    label[4:12, 4:12] = 1
    items = [
        {"image": np.zeros((16, 16), np.float32), "label": label, "synthetic_images": [np.ones((16, 16), np.float32)]},
        {"image": np.full((16, 16), 10.0, np.float32), "label": label,
         "synthetic_images": [np.full((16, 16), 2.0, np.float32), np.full((16, 16), 3.0, np.float32)]},
    ]  # fmt: skip
    network = RecordingSegmenter()
    settings = {"label_format": "index", "normalisation": "none", "steps": 40, "batch_size": 2}
    train_segmenter(items, [0, 1], 0, network=network, patch_mixing={"alpha": 0.25, "patch_size": 4}, **settings)
    inputs = torch.cat(network.inputs)[:, 0]
    cells = inputs.view(-1, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(-1, 16, 16)
    assert torch.equal(cells.amin(-1), cells.amax(-1))  # block-constant on the patch grid
    values = set(torch.unique(inputs).tolist())
    assert values == {0.0, 1.0, 2.0, 3.0, 10.0}
    first, second = inputs[inputs.amax((1, 2)) <= 1], inputs[inputs.amax((1, 2)) > 1]
    assert not torch.isin(second, torch.tensor([0.0, 1.0])).any()  # never another item's counterpart
    real_fraction = torch.cat([(first == 0).flatten(), (second == 10).flatten()]).float().mean().item()
    assert real_fraction == pytest.approx(0.25, abs=0.05)


def test_patch_mixing_needs_synthetic_counterparts_for_every_item(test_items):
    items = _items(seed=5, count=4)
    for item in items[:3]:
        item["synthetic_images"] = [item["image"]]
    with pytest.raises(ValueError, match=r"training set 'mixed' item 3 .* has no 'synthetic_images'"):
        compare_training_sets(
            {"real": items, "mixed": items}, test_items, CLASS_CHANNELS, merge_into=3,
            patch_mixing={"mixed": {"alpha": 0.5, "patch_size": 4}},
        )  # fmt: skip
    with pytest.raises(ValueError, match="names the training set 'other'"):
        compare_training_sets({"real": items}, test_items, CLASS_CHANNELS, merge_into=3,
                              patch_mixing={"other": {"alpha": 0.5, "patch_size": 4}})  # fmt: skip


# --- EMIT-Diff's study: traditional augmentations, AttentionUnet, cross-validation folds ------------------------------


def _square_sample() -> dict:
    """A z-scored-like image, an off-centre bright rectangle on a faint ramp, and its label, ``[1, 48, 48]`` each."""
    label = torch.zeros(1, 48, 48, dtype=torch.long)
    label[0, 6:20, 10:34] = 1
    ramp = torch.linspace(0.0, 0.2, 48)[None, None, :]
    return {"image": label.float() * 2.0 - 0.5 + ramp, "label": label}


@pytest.mark.parametrize("name", TRADITIONAL_AUGMENTATIONS)
def test_each_traditional_augmentation_changes_the_image_and_moves_the_label_only_when_spatial(name):
    sample = _square_sample()
    transform = traditional_augmentation(name, prob=1.0, seed=3)
    draws = [transform(dict(sample)) for _ in range(4)]
    first_again = traditional_augmentation(name, prob=1.0, seed=3)(dict(sample))
    assert torch.equal(torch.as_tensor(first_again["image"]), torch.as_tensor(draws[0]["image"]))  # seeded
    images = [torch.as_tensor(draw["image"]) for draw in draws]
    labels = [torch.as_tensor(draw["label"]) for draw in draws]
    assert all(image.shape == (1, 48, 48) for image in images)
    assert all(not torch.allclose(image, sample["image"]) for image in images)
    if name in ("mirror", "rotate", "scale"):
        assert any(not torch.equal(label.long(), sample["label"]) for label in labels)
        for image, label in zip(images, labels):
            assert set(torch.unique(label).tolist()) <= {0, 1}  # nearest-neighbour: still a mask
            assert ((image > 0.5) == label.bool()).float().mean() > 0.97  # the label moved with the image
    else:
        assert all(torch.equal(label, sample["label"]) for label in labels)
        assert any(not torch.allclose(images[0], image) for image in images[1:])  # a fresh draw each call


def test_unknown_augmentation_and_architecture_are_refused_by_name():
    with pytest.raises(ValueError, match="augmentation must be one of .*'mirror'.* got 'flip'"):
        traditional_augmentation("flip")
    with pytest.raises(ValueError, match="architecture must be one of"):
        SliceSegmenter(2, architecture="swin")


def test_attention_unet_segmenter_keeps_the_size_of_odd_slices():
    network = SliceSegmenter(num_classes=3, channels=(4, 8, 16), architecture="attention_unet")
    assert network(torch.zeros(2, 1, 56, 71)).shape == (2, 3, 56, 71)
    assert "AttentionUnet" in type(network.unet).__name__


def _fold(subjects: list[str], dice: float) -> dict:
    scores = {s: {"fg": dice} for s in subjects}
    return summarise_comparison(
        {name: {m: scores for m in ("dice", "precision", "recall", "hd95", "assd")} for name in ("real", "mixed")},
        "real",
        {"real": 4, "mixed": 4},
    )


def test_cross_validation_folds_combine_into_one_result_over_every_subject():
    combined = combine_folds([_fold(["a", "b"], 0.6), _fold(["c"], 0.9)])
    assert set(combined["per_subject"]["real"]) == {"a", "b", "c"}
    assert combined["mean_dice"]["real"]["fg"] == pytest.approx(0.7)  # over subjects, not over fold means
    assert combined["num_items"] == {"real": [4, 4], "mixed": [4, 4]}
    assert set(combined["per_subject_metrics"]["mixed"]) == {"precision", "recall", "hd95", "assd"}
    table = format_summary_table(combined).splitlines()
    assert "3 test subjects (2-fold cross-validation" in table[0] and "| real | 4 / 4 | 0.700" in table[4]
    assert "Precision | Recall | HD95" in table[2]
    with pytest.raises(ValueError, match="subject 'b' is tested in folds 0 and 1"):
        combine_folds([_fold(["a", "b"], 0.6), _fold(["b"], 0.9)])
