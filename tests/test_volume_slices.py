"""The PI-CAI-style user path: volumes -> central slices on the T2W grid, per-volume window, slice lesion labels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medgen_common.datalist import DatalistError
from medgen_common.volume_slices import extract_central_slices


def _write(path, array, spacing):
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path.name


@pytest.fixture
def volumes(tmp_path):
    """Two cases: T2W 32 x 32 x 14 at (2, 2, 3) mm; ADC and DW at half the in-plane resolution; a lesion box on
    slices 5-7 of case 0 (bright on DW), none in case 1."""
    rng = np.random.default_rng(0)
    entries = []
    for case in range(2):
        t2w = rng.uniform(100, 400, (32, 32, 14))
        adc = rng.uniform(500, 1500, (16, 16, 14))
        dwi = rng.uniform(10, 50, (16, 16, 14))
        lesion = np.zeros((32, 32, 14))
        if case == 0:
            lesion[10:14, 18:22, 5:8] = 1
            dwi[5:7, 9:11, 5:8] = 400
        names = {key: _write(tmp_path / f"case{case}_{key}.nii.gz", array, spacing)
                 for key, array, spacing in (("t2w", t2w, (2, 2, 3)), ("adc", adc, (4, 4, 3)), ("dwi", dwi, (4, 4, 3)),
                                             ("lesion", lesion, (2, 2, 3)))}  # fmt: skip
        entries.append({**names, "case": f"case{case}"})
    (tmp_path / "volumes.json").write_text(json.dumps({"training": entries[:1], "test": entries[1:]}))
    return tmp_path / "volumes.json"


def test_central_slices_on_the_t2w_grid_with_slice_labels(volumes, tmp_path):
    datalist = json.loads(extract_central_slices(volumes, tmp_path / "slices", num_central_slices=10).read_text())
    assert "validation" not in datalist and len(datalist["training"]) == len(datalist["test"]) == 10
    slices = [item["slice"] for item in datalist["training"]]
    assert slices == list(range(2, 12))  # the 10 central of 14
    labels = {item["slice"]: item["lesion_present"] for item in datalist["training"]}
    assert [z for z, present in labels.items() if present] == [5, 6, 7]
    assert all(item["lesion_present"] == 0 and item["lesion_centre"] is None for item in datalist["test"])
    item = next(i for i in datalist["training"] if i["slice"] == 6)
    assert item["lesion_centre"] == [11.5, 19.5]
    for key in ("t2w", "adc", "dwi", "lesion"):
        image = nib.load(str(tmp_path / "slices" / item[key]))
        assert image.shape == (32, 32, 1), key  # ADC and DW resampled to the T2W grid
        assert np.allclose(np.diag(image.affine)[:3], [2, 2, 3])
    dwi = np.asarray(nib.load(str(tmp_path / "slices" / item["dwi"])).dataobj)[..., 0]
    assert 0.0 <= dwi.min() and dwi.max() <= 1.0
    # per-volume window: the bright lesion is near 1 and the background stays dark on the lesion's slice
    assert dwi[10:14, 18:22].mean() > 0.8 and np.median(dwi) < 0.2


def test_bad_volumes_are_refused(volumes, tmp_path):
    with pytest.raises(ValueError, match="fewer than num_central_slices=20"):
        extract_central_slices(volumes, tmp_path / "a", num_central_slices=20)
    with pytest.raises(ValueError, match="reference sequence 'flair'"):
        extract_central_slices(volumes, tmp_path / "b", reference="flair")
    content = json.loads(volumes.read_text())
    content["training"][0].pop("adc")
    volumes.write_text(json.dumps(content))
    with pytest.raises(DatalistError, match=r"missing key\(s\) \['adc'\]"):
        extract_central_slices(volumes, tmp_path / "c")
