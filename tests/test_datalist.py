"""Tests of medgen_common.datalist: loading a split, resolving paths, and the errors that name the faulty entry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen_common.datalist import DatalistError, check_channel_count, check_consistent_shapes, load_datalist


def _write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _write_nifti(path: Path, shape: tuple[int, ...]) -> str:
    data = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


# --- load_datalist: file-level errors ---------------------------------------------------------------------------------


def test_missing_datalist_file_raises_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(DatalistError, match="datalist file not found") as info:
        load_datalist(missing)
    assert str(missing) in str(info.value)


def test_datalist_error_is_a_value_error():
    assert issubclass(DatalistError, ValueError)


def test_invalid_json_raises_datalist_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"training": [')
    with pytest.raises(DatalistError, match="is not valid JSON") as info:
        load_datalist(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_top_level_list_is_rejected_with_its_type(tmp_path):
    path = _write_json(tmp_path / "list.json", [{"image": "a.nii.gz"}])
    with pytest.raises(DatalistError, match="must be a JSON object with split keys, got list"):
        load_datalist(path)


def test_missing_split_message_lists_the_splits_present(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    path = _write_json(
        tmp_path / "d.json",
        {"training": [{"image": "a.nii.gz"}], "test": [{"image": "a.nii.gz"}], "description": "not a split"},
    )
    with pytest.raises(DatalistError) as info:
        load_datalist(path, split="validation")
    message = str(info.value)
    assert "has no 'validation' list" in message
    assert "['training', 'test']" in message  # only list-valued keys are reported as splits
    assert "description" not in message


@pytest.mark.parametrize("value", [[], {}, "a.nii.gz"])
def test_empty_or_non_list_split_is_rejected(tmp_path, value):
    path = _write_json(tmp_path / "d.json", {"training": value})
    with pytest.raises(DatalistError, match="split 'training' is empty or not a list"):
        load_datalist(path)


# --- load_datalist: entry-level errors --------------------------------------------------------------------------------


def test_entry_that_is_not_an_object_names_split_and_index(tmp_path):
    _touch(tmp_path / "a.nii.gz")
    path = _write_json(tmp_path / "d.json", {"validation": [{"image": "a.nii.gz"}, "a.nii.gz"]})
    with pytest.raises(DatalistError) as info:
        load_datalist(path, split="validation")
    assert "validation[1]" in str(info.value)
    assert "entry must be an object, got str" in str(info.value)


def test_entry_missing_required_key_names_split_index_and_key(tmp_path):
    _touch(tmp_path / "a.nii.gz")
    _touch(tmp_path / "a_label.nii.gz")
    path = _write_json(
        tmp_path / "d.json",
        {"training": [{"image": "a.nii.gz", "label": "a_label.nii.gz"}, {"image": "a.nii.gz", "age": 40}]},
    )
    with pytest.raises(DatalistError) as info:
        load_datalist(path, split="training", required_keys=("image", "label"))
    message = str(info.value)
    assert "training[1]" in message
    assert "missing key(s) ['label']" in message
    assert "entry has ['age', 'image']" in message


def test_nonexistent_file_names_entry_index_key_and_resolved_path(tmp_path):
    _touch(tmp_path / "a.nii.gz")
    path = _write_json(
        tmp_path / "d.json",
        {"training": [{"image": "a.nii.gz", "label": "a.nii.gz"}, {"image": "a.nii.gz", "label": "gone.nii.gz"}]},
    )
    with pytest.raises(DatalistError) as info:
        load_datalist(path, required_keys=("image", "label"))
    message = str(info.value)
    assert "training[1]" in message
    assert "file for key 'label' does not exist" in message
    assert str(tmp_path / "gone.nii.gz") in message


@pytest.mark.parametrize("value", ["", 3, None])
def test_non_path_value_for_required_key_is_rejected(tmp_path, value):
    path = _write_json(tmp_path / "d.json", {"training": [{"image": value}]})
    with pytest.raises(DatalistError, match=r"training\[0\]: key 'image' must be a file path"):
        load_datalist(path, check_files=False)


# --- load_datalist: path resolution ----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_datalist_folder_and_absolute_paths_are_kept(tmp_path):
    data_dir = tmp_path / "lists"
    _touch(data_dir / "images" / "a.nii.gz")
    elsewhere = _touch(tmp_path / "other" / "b.nii.gz")
    path = _write_json(
        data_dir / "d.json", {"training": [{"image": "images/a.nii.gz"}, {"image": str(elsewhere)}]}
    )
    entries = load_datalist(path)
    assert [e["image"] for e in entries] == [str(data_dir / "images" / "a.nii.gz"), str(elsewhere)]
    assert all(Path(e["image"]).is_absolute() for e in entries)


@pytest.mark.parametrize("value", ["../outside.nii.gz", "images/../../outside.nii.gz"])
def test_relative_path_climbing_out_of_the_dataset_root_is_refused(tmp_path, value):
    _touch(tmp_path / "outside.nii.gz")  # exists: the path is refused for where it points, not for being absent
    data_dir = tmp_path / "data"
    _touch(data_dir / "images" / "a.nii.gz")
    path = _write_json(data_dir / "d.json", {"training": [{"image": "images/a.nii.gz"}, {"image": value}]})
    with pytest.raises(DatalistError) as info:
        load_datalist(path)
    assert str(info.value) == (
        f"datalist '{path}', training[1]: key 'image' path '{value}' points outside the dataset root '{data_dir}'; "
        "relative paths must stay inside it (give an absolute path to use a file elsewhere)."
    )


def test_dot_dot_that_stays_inside_the_root_is_accepted(tmp_path):
    _touch(tmp_path / "images" / "a.nii.gz")
    (tmp_path / "other").mkdir()
    path = _write_json(tmp_path / "d.json", {"training": [{"image": "other/../images/a.nii.gz"}]})
    assert Path(load_datalist(path)[0]["image"]).resolve() == (tmp_path / "images" / "a.nii.gz").resolve()


def test_base_dir_overrides_the_datalist_folder(tmp_path):
    base = tmp_path / "data"
    _touch(base / "a.nii.gz")
    (tmp_path / "lists").mkdir()
    path = _write_json(tmp_path / "lists" / "d.json", {"training": [{"image": "a.nii.gz"}]})
    entries = load_datalist(path, base_dir=base)
    assert entries[0]["image"] == str(base / "a.nii.gz")
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(path)  # without base_dir the same entry resolves beside the datalist, where it is absent


def test_list_valued_keys_resolve_every_path_and_stay_lists(tmp_path):
    _touch(tmp_path / "t1.nii.gz")
    _touch(tmp_path / "flair.nii.gz")
    path = _write_json(tmp_path / "d.json", {"training": [{"image": ["t1.nii.gz", "flair.nii.gz"]}]})
    entries = load_datalist(path)
    assert entries[0]["image"] == [str(tmp_path / "t1.nii.gz"), str(tmp_path / "flair.nii.gz")]


def test_missing_file_inside_a_list_valued_key_is_reported(tmp_path):
    _touch(tmp_path / "t1.nii.gz")
    path = _write_json(tmp_path / "d.json", {"training": [{"image": ["t1.nii.gz", "flair.nii.gz"]}]})
    with pytest.raises(DatalistError, match="flair.nii.gz"):
        load_datalist(path)


def test_check_files_false_resolves_paths_without_requiring_them(tmp_path):
    path = _write_json(tmp_path / "d.json", {"test": [{"image": "not_yet.nii.gz"}]})
    entries = load_datalist(path, split="test", check_files=False)
    assert entries == [{"image": str(tmp_path / "not_yet.nii.gz")}]
    assert not Path(entries[0]["image"]).exists()


def test_extra_keys_pass_through_untouched_and_input_is_not_modified(tmp_path):
    _touch(tmp_path / "a.nii.gz")
    raw = {"image": "a.nii.gz", "age": 71, "subject": "sub-01", "lesion_volumes": [1.5, 0.0], "notes": "x/y.nii.gz"}
    path = _write_json(tmp_path / "d.json", {"training": [raw]})
    (entry,) = load_datalist(path)
    assert entry["image"] == str(tmp_path / "a.nii.gz")
    assert {k: v for k, v in entry.items() if k != "image"} == {
        "age": 71,
        "subject": "sub-01",
        "lesion_volumes": [1.5, 0.0],
        "notes": "x/y.nii.gz",  # not a required key: not resolved as a path
    }


def test_required_keys_can_be_empty_for_metadata_only_splits(tmp_path):
    path = _write_json(tmp_path / "d.json", {"training": [{"age": 1}, {"age": 2}]})
    assert load_datalist(path, required_keys=()) == [{"age": 1}, {"age": 2}]


# --- check_consistent_shapes / check_channel_count -------------------------------------------------------------------


def test_consistent_shapes_pass_and_return_the_shared_shape(tmp_path):
    entries = [{"label": _write_nifti(tmp_path / f"l{i}.nii.gz", (4, 5, 3, 2))} for i in range(3)]
    assert check_consistent_shapes(entries, "label") == (4, 5, 3, 2)


def test_different_spatial_shape_raises_naming_both_files(tmp_path):
    first = _write_nifti(tmp_path / "first.nii.gz", (4, 5, 3, 2))
    second = _write_nifti(tmp_path / "second.nii.gz", (4, 5, 3, 2))
    odd = _write_nifti(tmp_path / "odd.nii.gz", (4, 6, 3, 2))
    entries = [{"label": first}, {"label": second}, {"label": odd}]
    with pytest.raises(DatalistError) as info:
        check_consistent_shapes(entries, "label")
    message = str(info.value)
    assert message.startswith("entry 2:")
    assert f"'{odd}' has shape (4, 6, 3, 2)" in message
    assert f"'{first}' has (4, 5, 3, 2)" in message


def test_different_channel_count_is_reported_as_channel_count_naming_both_files(tmp_path):
    first = _write_nifti(tmp_path / "first.nii.gz", (4, 5, 3, 2))
    odd = _write_nifti(tmp_path / "odd.nii.gz", (4, 5, 3, 4))
    with pytest.raises(DatalistError) as info:
        check_consistent_shapes([{"label": first}, {"label": odd}], "label")
    message = str(info.value)
    assert f"'{odd}' has channel count (4, 5, 3, 4)" in message
    assert f"'{first}' has (4, 5, 3, 2)" in message


def test_corrupt_nifti_raises_datalist_error_naming_the_file(tmp_path):
    good = _write_nifti(tmp_path / "good.nii.gz", (4, 5, 3))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a gzip stream, nor a NIfTI header" * 10)
    with pytest.raises(DatalistError) as info:
        check_consistent_shapes([{"image": good}, {"image": str(corrupt)}], "image")
    assert f"entry 1: cannot read 'image' file '{corrupt}'" in str(info.value)
    assert info.value.__cause__ is not None


def test_check_consistent_shapes_of_no_entries_raises():
    with pytest.raises(DatalistError, match="no entries to check"):
        check_consistent_shapes([], "image")


def test_check_channel_count_accepts_the_configured_count(tmp_path):
    entries = [{"label": _write_nifti(tmp_path / f"l{i}.nii.gz", (4, 5, 3, 3))} for i in range(2)]
    assert check_channel_count(entries, "label", ["background", "wm", "gm"]) == (4, 5, 3, 3)


def test_check_channel_count_rejects_a_wrong_count_naming_the_channels(tmp_path):
    path = _write_nifti(tmp_path / "l.nii.gz", (4, 5, 3, 2))
    names = ["background", "csf", "gm", "wm"]
    with pytest.raises(DatalistError) as info:
        check_channel_count([{"label": path}], "label", names)
    message = str(info.value)
    assert "'label' files have 2 channels" in message
    assert "(4, 5, 3, 2)" in message
    assert path in message
    assert "names 4: ['background', 'csf', 'gm', 'wm']" in message


def test_check_channel_count_also_rejects_inconsistent_shapes(tmp_path):
    a = _write_nifti(tmp_path / "a.nii.gz", (4, 5, 3, 2))
    b = _write_nifti(tmp_path / "b.nii.gz", (4, 5, 3, 3))
    with pytest.raises(DatalistError, match="channel count"):
        check_channel_count([{"label": a}, {"label": b}], "label", ["background", "lesion"])


def test_label_datalist_checks_channels_before_training(tmp_path):
    good = _write_nifti(tmp_path / "a.nii.gz", (4, 5, 1, 3))
    datalist = _write_json(tmp_path / "datalist.json", {"training": [{"label": "a.nii.gz"}]})
    from medgen_common.datalist import load_label_datalist

    assert load_label_datalist(datalist, "training", ["background", "gm", "wm"]) == [{"label": good}]
    with pytest.raises(DatalistError, match="'label' files have 3 channels.*names 4"):
        load_label_datalist(datalist, "training", ["background", "csf", "gm", "wm"])
