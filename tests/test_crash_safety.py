"""Crash safety: a process killed (SIGKILL) in the middle of a write leaves the previous file intact or no file under
the final name, never a truncated one. A child process rewrites one file in a loop with a new value each time; the
test kills it while a temporary file exists (a write is under way) and reads what the final name holds. A control
that writes in place shows that the kill does land mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

COMMON = Path(__file__).resolve().parents[1] / "common"
VOXELS = (256, 256, 128)  # 32 MB of float32: a write takes long enough to be caught in the middle

WRITERS = {
    "save_nifti": """
from medgen_common.writers import save_nifti
def write(value, path):
    save_nifti(np.full(SHAPE, value, np.float32), path, channel_first=False)
""",
    "SaveImaged writer": """
from medgen_common.transforms import AtomicNibabelWriter
def write(value, path):
    writer = AtomicNibabelWriter()
    writer.set_data_array(np.full(SHAPE, value, np.float32), channel_dim=None)
    writer.write(path)
""",
    "checkpoint": """
import torch
from medgen_common.writers import atomic_path
def write(value, path):  # as TrainingStateHandler writes the training state
    with atomic_path(path) as temporary:
        torch.save({"weights": torch.full(SHAPE, float(value))}, temporary)
""",
    "in place (control)": """
import nibabel as nib
def write(value, path):
    nib.save(nib.Nifti1Image(np.full(SHAPE, value, np.float32), np.eye(4)), path)
""",
}

LOOP = """
import sys
import numpy as np
SHAPE = {shape}
{writer}
path = sys.argv[1]
value = 0
while True:
    value += 1
    write(value, path)
    print(value, flush=True)
"""


def _read(path: Path, kind: str) -> np.ndarray:
    if kind == "checkpoint":
        return torch.load(path, weights_only=True)["weights"].numpy()
    return np.asarray(nib.load(path).get_fdata(dtype=np.float32))


def _kill_mid_write(kind: str, path: Path) -> int:
    """Start the writing loop, let it finish one file, kill it while the next write is under way; return the number
    of completed writes."""
    script = LOOP.format(shape=VOXELS, writer=WRITERS[kind])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(COMMON), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "1", "the first write did not complete"
        expected_size = path.stat().st_size
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            temporaries = [p for p in path.parent.iterdir() if p.name.startswith(".")]
            size = path.stat().st_size if path.exists() else expected_size
            if kind == "in place (control)":
                if 0 < size < expected_size:
                    break  # the final name is being rewritten right now
            elif temporaries and temporaries[0].stat().st_size > 0:
                break  # a write into the temporary file is under way
            time.sleep(0.001)
        else:
            pytest.fail("never caught a write under way")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    completed = [line for line in child.stdout.read().split() if line.strip()]
    return 1 + len(completed)


@pytest.mark.parametrize("kind", ["save_nifti", "SaveImaged writer", "checkpoint"])
def test_a_write_killed_midway_leaves_the_previous_complete_file(tmp_path, kind):
    path = tmp_path / ("state.pt" if kind == "checkpoint" else "sample.nii")
    completed = _kill_mid_write(kind, path)
    data = _read(path, kind)  # a truncated file would fail to load here
    assert data.shape == VOXELS
    value = float(data.flat[0])
    assert value in (completed, completed + 1)  # the last complete write (or one finished as the kill arrived)
    assert np.all(data == value), "the file mixes two writes"
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(name.startswith(".") for name in leftovers)  # at most a hidden temporary, never another final name


def test_control_writing_in_place_is_caught_truncated(tmp_path):
    """Without the rename, the same kill leaves a truncated file: the test above can fail."""
    path = tmp_path / "sample.nii"
    _kill_mid_write("in place (control)", path)
    with pytest.raises(Exception):
        data = _read(path, "in place (control)")
        assert data.shape == VOXELS and np.all(data == data.flat[0])
