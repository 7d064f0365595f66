"""The bundle harness must fail loudly: invalid metadata, metadata shapes that disagree with the configs, and
outputs whose shape or dtype differ from the declaration are all reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch

from medgen_common.writers import save_nifti
from tools import bundles as harness

LABEL_BUNDLE = harness.BUNDLES_DIR / "brainspade_label_ldm"


@pytest.fixture
def bundle_copy(tmp_path):
    copy = tmp_path / LABEL_BUNDLE.name
    shutil.copytree(LABEL_BUNDLE / "configs", copy / "configs")
    return copy


def _edit_metadata(bundle_root, edit):
    path = bundle_root / "configs" / "metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


@pytest.mark.parametrize("field", ["version", "network_data_format", "copyright", "changelog"])
def test_metadata_missing_a_required_field_is_rejected(bundle_copy, field):
    _edit_metadata(bundle_copy, lambda m: m.pop(field))
    with pytest.raises(jsonschema.ValidationError, match=field):
        harness.validate_metadata(bundle_copy)


def test_tensor_without_value_range_is_rejected(bundle_copy):
    _edit_metadata(bundle_copy, lambda m: m["network_data_format"]["inputs"]["image"].pop("value_range"))
    with pytest.raises(jsonschema.ValidationError, match="value_range"):
        harness.validate_metadata(bundle_copy)


def test_version_without_changelog_entry_is_rejected(bundle_copy):
    _edit_metadata(bundle_copy, lambda m: m.update(version="9.9.9"))
    with pytest.raises(ValueError, match="9.9.9.*changelog"):
        harness.validate_metadata(bundle_copy)


@pytest.mark.skipif(not harness.OFFICIAL_METADATA_SCHEMA.is_file(), reason="../shared/schemas is not beside the repository")
def test_official_monai_check_rejects_invalid_metadata(bundle_copy):
    _edit_metadata(bundle_copy, lambda m: m.pop("monai_version"))
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bundle_copy / "configs/metadata.json"),
         "--filepath", str(harness.OFFICIAL_METADATA_SCHEMA)],
        capture_output=True, text=True, env=harness.worker_environment(),
    )  # fmt: skip
    assert result.returncode != 0 and "monai_version" in result.stdout + result.stderr


def test_declared_shape_that_disagrees_with_the_config_is_reported(bundle_copy):
    def shrink(metadata):
        metadata["network_data_format"]["post_processed_outputs"]["pred"]["spatial_shape"] = [100, 100]

    _edit_metadata(bundle_copy, shrink)
    configs = harness.config_paths(bundle_copy, ["configs/inference.json"], demo=False)
    mismatches = harness.declared_shape_mismatches(bundle_copy, configs)
    assert len(mismatches) == 1 and "spatial_shape" in mismatches[0] and "[100, 100]" in mismatches[0]


def test_output_of_wrong_shape_or_dtype_fails_the_output_check(tmp_path):
    good = save_nifti(torch.rand(8, 56, 64), tmp_path / "good_label.nii.gz")
    harness.check_output_files([good], num_channels=8, spatial_shape=[56, 64], dtype="float32")
    with pytest.raises(AssertionError, match=r"good_label.*\[56, 64, 1, 8\].*\[48, 64, 1, 8\]"):
        harness.check_output_files([good], num_channels=8, spatial_shape=[48, 64], dtype="float32")
    with pytest.raises(AssertionError, match="declared 10 channels|10\\]"):
        harness.check_output_files([good], num_channels=10, spatial_shape=[56, 64], dtype="float32")
    as_int = save_nifti(np.zeros((8, 56, 64), dtype=np.int16), tmp_path / "int_label.nii.gz")
    with pytest.raises(AssertionError, match="int16.*float32"):
        harness.check_output_files([as_int], num_channels=8, spatial_shape=[56, 64], dtype="float32")


def test_failing_workflow_raises_with_its_output(bundle_copy, tmp_path):
    with pytest.raises(harness.BundleRunError, match="datalist file not found"):
        harness.run_workflow(
            bundle_copy, harness.config_paths(bundle_copy, ["configs/train_autoencoder.json"]), run_id="training",
            overrides={"dataset_dir": str(tmp_path / "nowhere"), "device_name": "cpu"},
        )  # fmt: skip


def test_boolean_and_list_overrides_reach_the_config_with_their_types(tmp_path):
    import subprocess
    import sys

    from tools.bundles import _format_override

    config = tmp_path / "config.json"
    config.write_text('{"flag": true, "items": [0], "out": "", "run": ["$open(@out, \'w\').write(repr((@flag, @items)))"]}')
    out = tmp_path / "out.txt"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config), "--out", str(out),
               "--flag", _format_override(False), "--items", _format_override([1, "a", None])]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    assert out.read_text() == repr((False, [1, "a", None]))
