"""The MONAI Label app (tools/monailabel_app): a real `monailabel start_server` on loopback over demo studies returns
an inference from the elastography GAN and from the SPADE image generator through its REST endpoint.

MONAI Label is an optional extra (it needs torchvision, hence a multi-GB torch): run this with `make test-monailabel`,
which builds its own environment. Without monailabel the test skips and says so.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tools import bundles as harness

pytest.importorskip("monailabel", reason="MONAI Label is an optional extra: run `make test-monailabel`")

APP = Path(__file__).resolve().parents[1] / "tools" / "monailabel_app"
TRAIN = {"epochs": 1, "epoch_length": 2, "batch_size": 2, "val_interval": 1, "device_name": "cpu", "num_threads": 1}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both bundles trained for two iterations, a studies folder with a B-mode image, a label map and a T2-like
    slice from their demo data, and a MONAI Label server over them."""
    work = tmp_path_factory.mktemp("monailabel")
    studies = work / "studies"
    studies.mkdir()
    for name in ("virtual_elastography_gan", "spade_vaegan"):
        bundle_root, _, dataset_dir = harness.train_copy(harness.BUNDLES_DIR / name, work / "training" / name, TRAIN)
        (work / "served").mkdir(exist_ok=True)
        (work / "served" / name).symlink_to(bundle_root)  # the app looks for <bundles_dir>/<name>
        datalist = json.loads((dataset_dir / "datalist_2d.json").read_text())["test"][0]
        if name == "virtual_elastography_gan":
            shutil.copy(dataset_dir / datalist["bmode"], studies / "bmode_case.nii.gz")
        else:
            shutil.copy(dataset_dir / datalist["label"], studies / "brain_label.nii.gz")
            shutil.copy(dataset_dir / datalist["t2"], studies / "style_t2.nii.gz")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monailabel = Path(sys.executable).parent / "monailabel"
    command = [str(monailabel), "start_server", "--app", str(APP), "--studies", str(studies), "--host", "127.0.0.1",
               "--port", str(port), "--conf", "bundles_dir", str(work / "served"), "--conf", "demo", "true"]  # fmt: skip
    log = open(work / "server.log", "w")
    env = harness.worker_environment()
    env["PATH"] = f"{monailabel.parent}:{env['PATH']}"  # the monailabel script runs the `python` it finds first
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                info = json.loads(urllib.request.urlopen(f"{url}/info/", timeout=2).read())
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"monailabel exited: {(work / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        else:
            pytest.fail(f"monailabel did not start: {(work / 'server.log').read_text()[-3000:]}")
        yield url, info, work
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _infer(url: str, model: str, image: str, params: dict, out: Path) -> np.ndarray:
    boundary = "medgenboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            f"--{boundary}--\r\n").encode()  # fmt: skip
    request = urllib.request.Request(
        f"{url}/infer/{model}?image={image}&output=image", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=600) as response:
        out.write_bytes(response.read())
    return np.asarray(nib.load(out).dataobj)


def test_server_lists_both_bundles_as_infer_tasks(served):
    _, info, _ = served
    assert {"virtual_elastography_gan", "spade_vaegan"} <= set(info["models"])
    assert info["models"]["spade_vaegan"]["type"] == "others"
    assert "synthetic output" in info["models"]["virtual_elastography_gan"]["description"]


def test_elastography_infer_returns_an_rgb_elastogram(served, tmp_path):
    url, _, _ = served
    elastogram = _infer(url, "virtual_elastography_gan", "bmode_case", {}, tmp_path / "elastogram.nii.gz")
    bmode = np.asarray(nib.load(Path(served[2]) / "studies" / "bmode_case.nii.gz").dataobj)
    assert elastogram.shape[-1] == 3 and elastogram.shape[:2] == bmode.shape[:2]
    assert np.isfinite(elastogram).all() and elastogram.min() >= 0.0 and elastogram.max() <= 1.0


def test_spade_infer_returns_an_image_of_the_label_maps_shape(served, tmp_path):
    url, _, work = served
    image = _infer(url, "spade_vaegan", "brain_label", {"style": "style_t2", "contrast": "t2"}, tmp_path / "t2.nii.gz")
    label = np.asarray(nib.load(work / "studies" / "brain_label.nii.gz").dataobj)
    assert image.shape[:2] == label.shape[:2] and np.isfinite(image).all() and image.std() > 0
