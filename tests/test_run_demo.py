"""`make demo` runs `python -m tools.run_demo --out demo`: check it end to end, at two iterations per stage, from
another working directory with a relative output folder (as the Makefile calls it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools import bundles as harness

QUICK = {"epochs": 1, "epoch_length": 2, "batch_size": 2, "val_interval": 1, "num_samples": 2,
         "num_samples_per_group": 1, "num_inference_steps": 2, "num_threads": 1,
         "dds_steps": 2, "pc_levels": 2, "cs_iterations": 2, "num_test_images": 2}  # fmt: skip


def test_overrides_are_read_as_json_when_possible():
    assert harness.parse_overrides(["epochs=5", "device_name=cpu", "image_size=[8, 8]"]) == {
        "epochs": 5, "device_name": "cpu", "image_size": [8, 8]
    }  # fmt: skip
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        harness.parse_overrides(["epochs"])


def test_demo_runs_every_bundle_and_writes_the_report(tmp_path):
    command = [sys.executable, "-m", "tools.run_demo", "--out", "demo_out", "--subjects", "4", "--device", "cpu",
               "--pipeline-labels", "2", "--pipeline-steps", "3"]  # fmt: skip
    command += [arg for key, value in QUICK.items() for arg in ("--override", f"{key}={value}")]
    env = harness.worker_environment()
    env["PYTHONPATH"] = str(harness.REPO_ROOT)  # tools/ is run from the repository, not installed
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "demo_out" / "report.md").read_text()
    for bundle_root in harness.discover_bundles():
        assert f"## {bundle_root.name}" in report
        assert (tmp_path / "demo_out" / bundle_root.name / "samples").is_dir()
    assert "Evaluation:" in report
    assert "## brainSPADE pipeline" in report and "synthetic t1" in report  # the downstream table
    assert (tmp_path / "demo_out" / "brainspade_pipeline" / "datalist_synthetic.json").is_file()
