"""Complex brain slices for reconstruction: magnitude from the brain generator, a smooth phase, subject splits and
held-out slabs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.transforms import LoadImage

from medgen_common.demo_data import GENERATORS
from medgen_common.demo_data.mri import slab_split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    return root, json.loads(GENERATORS["mri"](root, n_subjects=4, seed=1)["demo/2d"].read_text())


def test_slices_are_complex_with_unit_peak_and_smooth_phase(dataset):
    root, content = dataset
    array = np.asarray(LoadImage(image_only=True)(str(root / "demo" / content["training"][3]["image"])))
    assert array.shape == (64, 64, 1, 2)
    image = array[:, :, 0, 0] + 1j * array[:, :, 0, 1]
    assert np.abs(image).max() == pytest.approx(1.0, abs=1e-6)
    brain = np.abs(image) > 0.2
    assert np.abs(np.angle(image[brain])).max() <= np.pi / 2 + 1e-6 and np.angle(image[brain]).std() > 0.05
    # smooth: neighbouring pixels' phases differ little inside the brain
    neighbours = brain[:, 1:] & brain[:, :-1]
    assert np.abs(np.angle(image[:, 1:] * np.conj(image[:, :-1])))[neighbours].mean() < 0.1


def test_splits_keep_subjects_apart_and_files_are_reproducible(dataset, tmp_path):
    root, content = dataset
    subjects = {split: {e["subject"] for e in content[split]} for split in ("training", "validation", "test")}
    assert all(subjects[split] for split in subjects)
    assert not (subjects["training"] & subjects["test"]) and not (subjects["training"] & subjects["validation"])
    again = json.loads(GENERATORS["mri"](tmp_path, n_subjects=4, seed=1)["demo/2d"].read_text())
    first = content["test"][0]["image"]
    assert (tmp_path / "demo" / first).read_bytes() == (root / "demo" / first).read_bytes() and again["test"] == content["test"]


def test_test_slabs_are_held_out_with_a_gap():
    planes = np.arange(10, 43)  # 33 planes: slabs centred on positions 6, 16 and 26
    slab, training = slab_split(planes, slab_half_width=1, gap=1)
    assert slab.tolist() == [15, 16, 17, 25, 26, 27, 35, 36, 37]
    assert np.abs(training[:, None] - slab[None]).min() == 2  # >= gap + 1 planes from every slab plane
    assert len(training) == len(planes) - 15


def test_held_out_subjects_contribute_only_their_slab_planes(dataset):
    _, content = dataset
    for split in ("validation", "test"):
        planes = {}
        for entry in content[split]:
            planes.setdefault(entry["subject"], []).append(entry["slice_index"])
        assert planes and all(len(subject_planes) == 9 for subject_planes in planes.values())  # 3 slabs x 3 planes
    assert len(content["training"]) > 10
    assert content["matrix"] == [64, 64] and content["slab_half_width"] == 1 and content["gap"] == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="contrast"):
        GENERATORS["mri"](tmp_path, n_subjects=3, contrast="dwi")
    with pytest.raises(ValueError, match="max_phase"):
        GENERATORS["mri"](tmp_path, n_subjects=3, max_phase=-1.0)
    with pytest.raises(ValueError, match="matrix"):
        GENERATORS["mri"](tmp_path, n_subjects=3, matrix=4)
    with pytest.raises(ValueError, match="gap"):
        GENERATORS["mri"](tmp_path, n_subjects=3, gap=-1)
