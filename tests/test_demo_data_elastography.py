"""The V-EUS demo data: files load as the bundle reads them, cases are reproducible, the simulated physics follows
its rules, and the decoupled control removes the B-mode's information about stiffness."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.transforms import EnsureChannelFirstd, LoadImaged

from medgen_common.demo_data import GENERATORS
from medgen_common.demo_data.elastography import LESION_CLASSES, simulate_case
from medgen_common.elastography import rgb_to_index
from medgen_common.elastography_evaluation import roc_auc

KEYS = ["bmode", "elastogram", "mask", "strain_index"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastography")
    return root, GENERATORS["elastography"](root, n_subjects=12, seed=3)


def test_files_load_channel_first_with_palette_colours(dataset):
    root, datalists = dataset
    assert set(datalists) == {"demo/2d", "demo_decoupled/2d"}
    content = json.loads(datalists["demo/2d"].read_text())
    assert [len(content[s]) for s in ("training", "validation", "test")] == [10, 1, 1]
    entry = content["test"][0]
    files = {key: str(root / "demo" / entry[key]) for key in KEYS + ["bmode_pocket"]}
    loaded = EnsureChannelFirstd(list(files), channel_dim=-1)(LoadImaged(list(files), image_only=True)(files))
    assert loaded["bmode"].shape == (1, 64, 64) and loaded["elastogram"].shape == (3, 64, 64)
    assert 0.0 <= float(loaded["bmode"].min()) and float(loaded["bmode"].max()) <= 1.0
    np.testing.assert_array_equal(rgb_to_index(np.asarray(loaded["elastogram"])), np.asarray(loaded["strain_index"][0]))
    assert set(np.unique(np.asarray(loaded["mask"]))) == {0, 1}
    assert len(np.unique(np.asarray(loaded["bmode_pocket"]))) <= 32 < len(np.unique(np.asarray(loaded["bmode"])))
    assert entry["malignant"] == int(entry["lesion_class"] == "malignant") and entry["strain_ratio"] > 0


def test_same_seed_same_bytes_and_prefix_property(dataset, tmp_path):
    root, _ = dataset
    GENERATORS["elastography"](tmp_path, n_subjects=4, seed=3, decoupled_control=False)
    first = json.loads((tmp_path / "demo" / "datalist_2d.json").read_text())["training"][0]
    for key in KEYS:
        assert (tmp_path / "demo" / first[key]).read_bytes() == (root / "demo" / first[key]).read_bytes()
    other = simulate_case(4, 0)
    assert not np.array_equal(other.bmode, simulate_case(3, 0).bmode)


def test_stiffness_rules_give_separable_strain_ratios_and_dark_stiff_lesions():
    cases = [simulate_case(0, i) for i in range(45)]
    ratios = {k: [c.strain_ratio for c in cases if c.lesion_class == k] for k in LESION_CLASSES}
    assert np.mean(ratios["malignant"]) > 1.5 and max(ratios["soft"]) < 1.0
    labels = [int(c.lesion_class == "malignant") for c in cases]
    assert roc_auc([c.strain_ratio for c in cases], labels) > 0.95
    darker = [c.bmode[c.mask > 0].mean() < c.bmode[c.mask == 0].mean() for c in cases if c.lesion_class == "malignant"]
    assert all(darker)


def test_decoupled_control_keeps_stiffness_and_removes_the_b_mode_cue():
    indices = range(60)
    coupled = [simulate_case(0, i) for i in indices]
    decoupled = [simulate_case(0, i, coupled=False) for i in indices]
    assert [c.lesion_class for c in coupled] == [d.lesion_class for d in decoupled]
    assert any(d.cue_class != d.lesion_class for d in decoupled)
    solid = [i for i, c in enumerate(coupled) if c.lesion_class != "soft"]  # anechoic cysts are darker still
    labels = [int(coupled[i].lesion_class == "malignant") for i in solid]

    def darkness(case):  # how much darker the lesion is than its surroundings: malignant vs benign cue
        return case.bmode[case.mask == 0].mean() - case.bmode[case.mask > 0].mean()

    assert roc_auc([darkness(coupled[i]) for i in solid], labels) > 0.9
    assert abs(roc_auc([darkness(decoupled[i]) for i in solid], labels) - 0.5) < 0.2
    labels = [int(c.lesion_class == "malignant") for c in coupled]
    assert roc_auc([d.strain_ratio for d in decoupled], labels) > 0.9  # the stiffness still separates the classes


@pytest.mark.parametrize(
    "options, message",
    [({"n_subjects": 0}, "n_subjects"), ({"seed": -1}, "seed"), ({"grids": ["huge"]}, "grid"),
     ({"depth_noise": -0.1}, "depth_noise"), ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction")],
)  # fmt: skip
def test_bad_arguments_name_the_argument(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        GENERATORS["elastography"](tmp_path, **{"n_subjects": 3, **options})
