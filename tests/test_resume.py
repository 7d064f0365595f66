"""Kill test: a bundle's demo training killed with SIGKILL in its second epoch and resumed with ``--resume true``
ends with the weights of an uninterrupted run with the same seed, and does not start over."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tools import bundles as harness

# 3 epochs of 6 iterations, the training state written every 2: the kill lands after a save in the middle of epoch 2
OVERRIDES = {"epochs": 3, "epoch_length": 6, "batch_size": 2, "val_interval": 3, "device_name": "cpu",
             "num_threads": 1, "num_workers": 0, "state_save_interval": 2}  # fmt: skip
KILL_WINDOW = range(7, 12)  # saved iterations inside epoch 2 (iterations 7-12)
CASES = [  # bundle, the training stage killed, its final weights and its training state
    ("brainspade_label_ldm", 0, "model_autoencoder.pt", "autoencoder_training_state.pt"),
    ("virtual_elastography_gan", 0, "model.pt", "training_state.pt"),
]


def _saved_iteration(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["engine"]["iteration"])
    except (OSError, RuntimeError, KeyError, EOFError):  # not written yet
        return 0


def _weights(path: Path) -> torch.Tensor:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return torch.cat([v.flatten().double() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()])


@pytest.mark.parametrize("bundle, stage_index, weights_file, state_file", CASES, ids=[c[0] for c in CASES])
def test_training_killed_in_its_second_epoch_resumes_to_the_uninterrupted_weights(
    tmp_path, bundle, stage_index, weights_file, state_file
):
    source = harness.BUNDLES_DIR / bundle
    bundle_root = tmp_path / bundle
    shutil.copytree(source, bundle_root, ignore=shutil.ignore_patterns("models", "eval", "output"))
    manifest = harness.load_manifest(bundle_root)
    dataset_dir = harness.make_demo_dataset(
        manifest["demo_data"], tmp_path / "data", num_subjects=manifest["demo_data"].get("test_subjects", 4)
    )
    configs = harness.config_paths(bundle_root, manifest["training"][stage_index]["config_files"])
    base = dict(OVERRIDES, dataset_dir=str(dataset_dir))

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    harness.run_workflow(bundle_root, configs, "training", dict(base, ckpt_dir=str(reference_dir)))

    command = harness.workflow_command(bundle_root, configs, "training", dict(base, ckpt_dir=str(killed_dir)))
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(
        command, cwd=bundle_root.resolve(), env=harness.worker_environment(), stdout=log, stderr=log
    )
    deadline = time.monotonic() + 600
    while (saved := _saved_iteration(killed_dir / state_file)) < KILL_WINDOW.start:
        assert (
            process.poll() is None
        ), f"training ended before its second epoch: {(tmp_path / 'killed.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no training state was written in its second epoch within 10 minutes"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    saved = _saved_iteration(killed_dir / state_file)
    assert saved in KILL_WINDOW, f"the kill came at iteration {saved}, not in the second epoch"
    assert not (killed_dir / weights_file).exists()

    resumed = harness.run_workflow(
        bundle_root, configs, "training", dict(base, ckpt_dir=str(killed_dir), resume=True),
        log_file=tmp_path / "resumed.log",
    )  # fmt: skip
    assert resumed.returncode == 0
    match = re.search(r"resumed from .* at epoch (\d+), iteration (\d+)", (tmp_path / "resumed.log").read_text())
    assert match and int(match.group(2)) == saved  # it continued from the kill, it did not start over
    difference = (_weights(killed_dir / weights_file) - _weights(reference_dir / weights_file)).abs().max()
    assert difference < 1e-5, f"resumed weights differ from the uninterrupted run by {difference:.3g}"
