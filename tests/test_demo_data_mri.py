"""Complex brain slices for reconstruction: magnitude from the brain generator, a smooth phase, subject splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.transforms import LoadImage

from medgen_common.demo_data import GENERATORS


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    return root, json.loads(GENERATORS["mri"](root, n_subjects=4, seed=1)["demo/2d"].read_text())


def test_slices_are_complex_with_unit_peak_and_smooth_phase(dataset):
    root, content = dataset
    array = np.asarray(LoadImage(image_only=True)(str(root / "demo" / content["training"][3]["image"])))
    assert array.shape == (56, 72, 1, 2)
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


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="contrast"):
        GENERATORS["mri"](tmp_path, n_subjects=3, contrast="dwi")
    with pytest.raises(ValueError, match="max_phase"):
        GENERATORS["mri"](tmp_path, n_subjects=3, max_phase=-1.0)
