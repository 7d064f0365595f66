"""The prostate phantom (prostate spec section 7.1): aligned sequences, zones, lesion contrast, files, determinism."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medgen_common.demo_data import GENERATORS
from medgen_common.demo_data.prostate import CONTRASTS, SEQUENCES, make_prostate_dataset, simulate_case


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("prostate")
    paths = make_prostate_dataset(out, n_subjects=20, seed=0)
    return out, json.loads(paths["demo/2d"].read_text())


def test_lesion_is_dark_on_t2w_and_adc_and_bright_on_dwi_at_the_same_place():
    cases = [simulate_case(0, i, 32) for i in range(200)]
    with_lesion = [c for c in cases if c.lesion_present]
    assert 0.4 <= len(with_lesion) / len(cases) <= 0.6  # p = 0.5
    for case in with_lesion:
        lesion, gland = case.lesion.astype(bool), np.isin(case.zones, (1, 2)) & ~case.lesion.astype(bool)
        assert gland.sum() > 0 and 4 <= lesion.sum() <= 40
        contrast = {s: case.images[s][lesion].mean() - case.images[s][gland].mean() for s in SEQUENCES}
        assert contrast["t2w"] < -0.05 and contrast["adc"] < -0.05 and contrast["dwi"] > 0.1, contrast
        assert lesion[int(round(case.lesion_centre[0])), int(round(case.lesion_centre[1]))] or lesion.sum() < 6
    for case in cases:
        if not case.lesion_present:
            assert case.lesion_centre is None and case.lesion.sum() == 0
        # zones: TZ anterior (smaller row) of the PZ, rectum posterior of the gland
        rows = {z: np.argwhere(case.zones == z)[:, 0].mean() for z in (1, 2, 3)}
        assert rows[1] < rows[2] < rows[3]
        for image in case.images.values():
            assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1


def test_fixed_window_keeps_tissue_levels_comparable_across_cases():
    # no per-slice rescaling: the PZ mean on T2W is the same tissue value whether or not a bright lesion is present
    cases = [simulate_case(0, i, 32) for i in range(100)]
    pz = {flag: [c.images["dwi"][(c.zones == 2) & (c.lesion == 0)].mean() for c in cases if c.lesion_present == flag]
          for flag in (True, False)}  # fmt: skip
    assert abs(np.mean(pz[True]) - np.mean(pz[False])) < 0.03
    assert abs(np.mean(pz[False]) - CONTRASTS["dwi"][0][3]) < 0.05


def test_files_datalist_and_determinism(dataset, tmp_path):
    out, datalist = dataset
    assert "prostate" in GENERATORS
    assert {k: len(datalist[k]) for k in ("training", "validation", "test")} == {
        "training": 15,
        "validation": 2,
        "test": 3,
    }
    assert datalist["sequences"] == list(SEQUENCES) and datalist["shape"] == [32, 32, 1]
    entry = datalist["test"][0]
    for key in (*SEQUENCES, "zones", "lesion"):
        image = nib.load(str(out / "demo" / entry[key]))
        assert image.shape == (32, 32, 1)
        assert np.allclose(np.diag(image.affine)[:2], 2.0)  # 64 mm over 32 pixels
    lesion = np.asarray(nib.load(str(out / "demo" / entry["lesion"])).dataobj)[..., 0]
    assert entry["lesion_present"] == int(lesion.any())
    # the first cases of a larger dataset are byte-identical
    make_prostate_dataset(tmp_path, n_subjects=40, seed=0)
    first = out / "demo" / datalist["training"][0]["t2w"]
    assert first.read_bytes() == (tmp_path / "demo" / datalist["training"][0]["t2w"]).read_bytes()
    with pytest.raises(ValueError, match="unknown grid 'huge'"):
        make_prostate_dataset(tmp_path, n_subjects=4, grids=("huge",))
