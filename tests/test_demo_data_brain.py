"""Tests of the brain demo-data generator (``medgen_common.demo_data.brain``) and ``tools.make_demo_data``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

from medgen_common.demo_data import GENERATORS
from medgen_common.demo_data.brain import (
    BRAIN_CHANNELS,
    GRIDS,
    IMAGE_KEYS,
    LESION_CHANNELS,
    make_brain_dataset,
    sample_brain_subject,
)
from medgen_common.demo_data.splits import split_names
from tools.make_demo_data import main as make_demo_data_main
from tools.make_demo_data import make_demo_data

REPO = Path(__file__).resolve().parents[1]
N_SUBJECTS = 4
SLICES = 3
GRID = GRIDS["demo"]


def _first_seed_with_and_without_lesions() -> int:
    """Smallest seed whose first N_SUBJECTS subjects include some with and some without a tumour, and with and
    without WMH, according to the generator's own draws."""
    for seed in range(100):
        subjects = [sample_brain_subject(seed, index) for index in range(N_SUBJECTS)]
        tumours = {subject.tumour is not None for subject in subjects}
        wmh = {len(subject.wmh_centres_mm) > 0 for subject in subjects}
        if tumours == wmh == {True, False}:
            return seed
    raise AssertionError("no seed below 100 mixes subjects with and without lesions")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 4-subject demo-grid dataset, generated with network access blocked."""
    out_dir = tmp_path_factory.mktemp("brain")

    def refuse(*args, **kwargs):
        raise AssertionError("the brain generator tried to use the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        seed = _first_seed_with_and_without_lesions()
        datalists = make_brain_dataset(out_dir, n_subjects=N_SUBJECTS, seed=seed, slices_per_subject=SLICES)
    contents = {name: json.loads(path.read_text()) for name, path in datalists.items()}
    return {"out_dir": out_dir, "seed": seed, "datalists": datalists, "contents": contents}


def _entries(content: dict) -> list[dict]:
    return [entry for split in ("training", "validation", "test") for entry in content[split]]


def _array(grid_dir: Path, relative: str) -> np.ndarray:
    return np.asarray(nib.load(grid_dir / relative).dataobj)


def test_registry_and_datalist_metadata(dataset):
    assert GENERATORS["brain"] is make_brain_dataset
    assert set(dataset["datalists"]) == {"demo/3d", "demo/2d"}
    for name, content in dataset["contents"].items():
        assert content["channels"] == list(BRAIN_CHANNELS)
        assert content["lesion_channels"] == list(LESION_CHANNELS)
        assert content["spacing_mm"] == [GRID.spacing_mm] * 3
        assert content["shape"] == (list(GRID.shape) if name.endswith("3d") else [*GRID.shape[:2], 1])
        assert content["seed"] == dataset["seed"]
        assert "simulated" in content["description"]


@pytest.mark.parametrize("dimension", ["3d", "2d"])
def test_every_datalist_file_loads_with_monai(dataset, dimension):
    path = dataset["datalists"][f"demo/{dimension}"]
    spatial = GRID.shape if dimension == "3d" else (*GRID.shape[:2], 1)
    loader = LoadImage(image_only=True)
    for split in ("training", "validation", "test"):
        entries = load_decathlon_datalist(path, data_list_key=split)
        assert entries, split
        for entry in entries:
            assert tuple(loader(entry["label"]).shape) == (*spatial, len(BRAIN_CHANNELS))
            for key in IMAGE_KEYS:
                image = loader(entry[key])
                assert tuple(image.shape) == spatial
                assert image.dtype.is_floating_point


@pytest.mark.parametrize("dimension", ["3d", "2d"])
def test_label_maps_are_probabilities_and_images_are_skull_stripped(dataset, dimension):
    grid_dir = dataset["out_dir"] / "demo"
    for entry in _entries(dataset["contents"][f"demo/{dimension}"]):
        label = _array(grid_dir, entry["label"])
        assert label.dtype == np.float32
        assert label.min() >= 0.0 and label.max() <= 1.0
        np.testing.assert_allclose(label.sum(-1), 1.0, atol=1e-4)
        background = label[..., BRAIN_CHANNELS.index("background")]
        for key in IMAGE_KEYS:
            image = _array(grid_dir, entry[key])
            assert image.dtype == np.float32
            assert image.min() >= 0.0 and image.max() <= 1.0
            assert np.all(image[background >= 0.5] == 0.0)
            assert np.mean(image[background < 0.01] > 0.0) > 0.99


def test_affines_have_the_grid_spacing_and_centre_the_brain(dataset):
    grid_dir = dataset["out_dir"] / "demo"
    slices_by_subject = {}
    for entry in _entries(dataset["contents"]["demo/2d"]):
        slices_by_subject.setdefault(entry["subject"], []).append(entry)
    for entry in _entries(dataset["contents"]["demo/3d"]):
        affines = [nib.load(grid_dir / entry[key]).affine for key in ("label", *IMAGE_KEYS)]
        for affine in affines[1:]:
            np.testing.assert_array_equal(affine, affines[0])
        affine = affines[0]
        np.testing.assert_allclose(affine[:3, :3], np.eye(3) * GRID.spacing_mm)
        # the brain's centre of mass lies near the grid centre (subjects are shifted by a few mm only)
        brain = 1.0 - _array(grid_dir, entry["label"])[..., BRAIN_CHANNELS.index("background")]
        centroid_voxel = np.array([np.average(np.indices(brain.shape)[axis], weights=brain) for axis in range(3)])
        centre_voxel = (np.array(GRID.shape) - 1) / 2
        assert np.linalg.norm((centroid_voxel - centre_voxel) * GRID.spacing_mm) < 12.0

        # each 2D slice is a plane of the 3D volume, at the same world position, among the planes with at least
        # half the largest brain area
        label_3d = _array(grid_dir, entry["label"])
        brain_area = brain.sum(axis=(0, 1))
        slices = slices_by_subject[entry["subject"]]
        assert len(slices) == SLICES
        assert len({s["slice_index"] for s in slices}) == SLICES
        for slice_entry in slices:
            z = slice_entry["slice_index"]
            slice_image = nib.load(grid_dir / slice_entry["label"])
            np.testing.assert_array_equal(np.asarray(slice_image.dataobj), label_3d[:, :, z : z + 1])
            np.testing.assert_allclose(slice_image.affine, affine @ np.array(
                [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z], [0, 0, 0, 1]]
            ))  # fmt: skip
            assert brain_area[z] >= 0.5 * brain_area.max()


def test_splits_are_disjoint_by_subject(dataset):
    content_3d, content_2d = dataset["contents"]["demo/3d"], dataset["contents"]["demo/2d"]
    splits = ("training", "validation", "test")
    subjects = {split: {entry["subject"] for entry in content_3d[split]} for split in splits}
    assert all(subjects.values())
    assert sum(len(s) for s in subjects.values()) == N_SUBJECTS
    assert set.union(*subjects.values()) == {f"sub-{i:03d}" for i in range(N_SUBJECTS)}
    for split, entries in subjects.items():
        assert {entry["subject"] for entry in content_2d[split]} == entries


@pytest.mark.parametrize("n_subjects", [3, 4, 7, 40])
def test_split_sizes(n_subjects):
    splits = split_names(n_subjects, 0.15, 0.15)
    counts = {split: splits.count(split) for split in ("training", "validation", "test")}
    assert len(splits) == n_subjects
    assert min(counts.values()) >= 1
    if n_subjects == 40:
        assert counts == {"training": 28, "validation": 6, "test": 6}


def test_split_sizes_without_minimum():
    assert split_names(2, 0.15, 0.15) == ["training", "training"]
    assert split_names(5, 0.0, 0.2) == ["training"] * 4 + ["test"]


@pytest.mark.parametrize("dimension", ["3d", "2d"])
def test_lesion_volumes_match_the_files(dataset, dimension):
    grid_dir = dataset["out_dir"] / "demo"
    voxel_mm3 = GRID.spacing_mm**3
    for entry in _entries(dataset["contents"][f"demo/{dimension}"]):
        label = _array(grid_dir, entry["label"]).astype(np.float64)
        assert set(entry["lesion_volume_mm3"]) == set(LESION_CHANNELS)
        for name, volume in entry["lesion_volume_mm3"].items():
            expected = label[..., BRAIN_CHANNELS.index(name)].sum() * voxel_mm3
            assert volume == pytest.approx(expected, rel=1e-5, abs=1e-2)


def test_lesions_follow_the_generator_draws(dataset):
    volumes = {entry["subject"]: entry["lesion_volume_mm3"] for entry in _entries(dataset["contents"]["demo/3d"])}
    for index in range(N_SUBJECTS):
        subject = sample_brain_subject(dataset["seed"], index)
        volume = volumes[f"sub-{index:03d}"]
        has_tumour = subject.tumour is not None
        assert (volume["tumour"] > 100.0) == has_tumour
        assert (volume["enhancing"] > 10.0) == has_tumour
        assert (volume["oedema"] > volume["tumour"]) == has_tumour
        assert (volume["wmh"] > 10.0) == (len(subject.wmh_centres_mm) > 0)
    # the fixture's seed was chosen so that both cases occur
    assert {v["tumour"] > 0 for v in volumes.values()} == {True, False}
    assert {v["wmh"] > 0 for v in volumes.values()} == {True, False}


def test_same_seed_gives_identical_bytes_and_prefix_subjects(dataset, tmp_path):
    """Subject i depends only on (seed, i): a 2-subject run reproduces the first two subjects' files exactly."""
    make_brain_dataset(tmp_path, n_subjects=2, seed=dataset["seed"], slices_per_subject=SLICES)
    written = sorted(p for p in (tmp_path / "demo").rglob("*.nii.gz"))
    assert len(written) == 2 * 4 * (1 + SLICES)
    for path in written:
        reference = dataset["out_dir"] / path.relative_to(tmp_path)
        assert path.read_bytes() == reference.read_bytes(), path.name


def test_different_seed_gives_different_subjects(dataset, tmp_path):
    make_brain_dataset(tmp_path, n_subjects=1, seed=dataset["seed"] + 1, slices_per_subject=1)
    relative = Path("demo/3d/sub-000_label.nii.gz")
    other = np.asarray(nib.load(tmp_path / relative).dataobj)
    reference = np.asarray(nib.load(dataset["out_dir"] / relative).dataobj)
    assert np.abs(other - reference).max() > 0.5


def test_channels_are_configurable(tmp_path):
    channels = ("wm", "gm", "csf", "background", "tumour")
    datalists = make_brain_dataset(tmp_path, n_subjects=1, slices_per_subject=1, channels=channels)
    content = json.loads(datalists["demo/3d"].read_text())
    assert content["channels"] == list(channels)
    assert content["lesion_channels"] == ["tumour"]
    entry = content["training"][0]
    assert set(entry["lesion_volume_mm3"]) == {"tumour"}
    label = _array(tmp_path / "demo", entry["label"])
    assert label.shape == (*GRID.shape, len(channels))
    np.testing.assert_allclose(label.sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"n_subjects": 0}, "n_subjects"),
        ({"seed": -1}, "seed"),
        ({"grids": ("5mm",)}, "grid"),
        ({"grids": ()}, "grids"),
        ({"slices_per_subject": 0}, "slices_per_subject"),
        ({"val_fraction": 1.2}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction"),
        ({"channels": ("background", "csf", "gm")}, "channels"),
        ({"channels": (*BRAIN_CHANNELS, "dgm")}, "dgm"),
    ],
)
def test_invalid_arguments_raise_value_error(tmp_path, arguments, named):
    with pytest.raises(ValueError, match=named.replace("+", r"\+")):
        make_brain_dataset(tmp_path, **arguments)
    assert not any(tmp_path.iterdir())


def test_unknown_modality_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="modality"):
        make_demo_data("heart", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        make_demo_data_main(["--modality", "brain", "--out", str(tmp_path), "--grid", "5mm"])
    assert exit_info.value.code == 2
    assert "unknown grid '5mm'" in capsys.readouterr().err


def test_cli_writes_the_datalists(tmp_path):
    command = [sys.executable, "-m", "tools.make_demo_data", "--modality", "brain", "--out", str(tmp_path)]
    command += ["--n", "3", "--seed", "5", "--slices-per-subject", "2"]
    command += ["--val-fraction", "0.3", "--test-fraction", "0.3"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "demo/3d" in result.stdout and "files" in result.stdout
    content = json.loads((tmp_path / "demo" / "datalist_3d.json").read_text())
    assert content["seed"] == 5
    assert [len(content[split]) for split in ("training", "validation", "test")] == [1, 1, 1]
    assert len(load_decathlon_datalist(tmp_path / "demo" / "datalist_2d.json", data_list_key="training")) == 2
