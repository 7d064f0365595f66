"""The bundle harness: every bundle under bundles/ is checked the same way, from its configs/workflows.json.

For each bundle: required files; metadata against the project's schema and MONAI's official one; metadata shapes
agree with the full-scale configs; every config parses and every network instantiates; MONAI's
verify_net_in_out; each training stage runs two iterations on CPU through `python -m monai.bundle run` and writes
its checkpoint; inference loads it and writes outputs of the declared shape and dtype; the multi-GPU override runs
under torchrun with two gloo processes; the evaluate workflow writes its report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medgen_common.datalist import load_datalist
from tools import benchmark
from tools import bundles as harness

BUNDLES = harness.discover_bundles()
BUNDLE_IDS = [path.name for path in BUNDLES]
REQUIRED_FILES = [
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "configs/workflows.json",
    "docs/README.md",
]
# two iterations of one epoch on a couple of samples, on the CPU
TEST_OVERRIDES = {
    "epochs": 1,
    "epoch_length": 2,
    "batch_size": 2,
    "val_interval": 1,
    "device_name": "cpu",
    "num_threads": 1,
}
TEST_INFERENCE_OVERRIDES = {
    "device_name": "cpu",
    "num_threads": 1,
    "num_samples": 2,
    "batch_size": 2,
    "num_inference_steps": 2,
}


def test_bundles_are_discovered():
    assert BUNDLES, "no bundle with configs/metadata.json under bundles/"


@pytest.mark.parametrize("bundle_root", BUNDLES, ids=BUNDLE_IDS)
def test_required_files_exist(bundle_root):
    missing = [name for name in REQUIRED_FILES if not (bundle_root / name).is_file()]
    assert not missing, f"{bundle_root.name} lacks {missing}"
    assert list((bundle_root / "configs").glob("train*.json")), f"{bundle_root.name} has no train*.json"


@pytest.mark.parametrize("bundle_root", BUNDLES, ids=BUNDLE_IDS)
def test_metadata_follows_project_schema(bundle_root):
    harness.validate_metadata(bundle_root)


@pytest.mark.skipif(
    not harness.OFFICIAL_METADATA_SCHEMA.is_file(), reason="../shared/schemas is not beside the repository"
)
@pytest.mark.parametrize("bundle_root", BUNDLES, ids=BUNDLE_IDS)
def test_metadata_follows_official_monai_schema(bundle_root):
    # an existing --filepath makes MONAI skip the download and validate against it
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bundle_root / "configs/metadata.json"),
         "--filepath", str(harness.OFFICIAL_METADATA_SCHEMA)],
        capture_output=True, text=True, env=harness.worker_environment(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metadata is verified with no error" in (result.stdout + result.stderr)


@pytest.mark.parametrize("bundle_root", BUNDLES, ids=BUNDLE_IDS)
def test_metadata_shapes_follow_full_scale_configs(bundle_root):
    manifest = harness.load_manifest(bundle_root)
    configs = harness.config_paths(bundle_root, manifest["inference"]["config_files"], demo=False)
    assert harness.declared_shape_mismatches(bundle_root, configs) == []


def _workflow_config_lists(bundle_root: Path) -> dict[str, list[str]]:
    manifest = harness.load_manifest(bundle_root)
    workflows = {f"train_{stage['name']}": stage["config_files"] for stage in manifest["training"]}
    workflows["inference"] = manifest["inference"]["config_files"]
    workflows["evaluate"] = manifest["evaluate"]["config_files"]
    return workflows


@pytest.mark.parametrize("bundle_root", BUNDLES, ids=BUNDLE_IDS)
@pytest.mark.parametrize("demo", [True, False], ids=["demo", "full"])
def test_configs_parse_and_networks_instantiate(bundle_root, demo):
    from monai.bundle import ConfigParser

    for workflow, files in _workflow_config_lists(bundle_root).items():
        parser = ConfigParser()
        parser.read_config(harness.config_paths(bundle_root, files, demo=demo))
        parser["bundle_root"] = str(bundle_root)
        network_ids = [key for key in parser.get() if key.endswith("_def")]
        assert network_ids, f"{workflow}: no *_def network in {files}"
        if not demo and workflow != "inference":
            continue  # full-scale networks are instantiated once, from the inference config
        for network_id in network_ids:
            network = parser.get_parsed_content(network_id)
            assert isinstance(network, torch.nn.Module), f"{workflow}: {network_id} is {type(network)}"


def _fake_forward_args(spec: dict) -> dict:
    return {
        name: torch.zeros(arg["shape"], dtype=getattr(torch, arg["dtype"]))
        for name, arg in spec.get("extra_forward_args", {}).items()
    }


@pytest.mark.parametrize("bundle_root", BUNDLES, ids=BUNDLE_IDS)
def test_networks_match_declared_input_and_output(bundle_root):
    """MONAI's verify_net_in_out on each network at full scale (it reads `network_data_format`, so each network's
    own `*_data_format` is passed in its place); networks whose `method` is not `forward` get the same check here."""
    from monai.bundle import ConfigParser, verify_net_in_out

    manifest = harness.load_manifest(bundle_root)
    meta_file = str(bundle_root / "configs/metadata.json")
    metadata = json.loads(Path(meta_file).read_text())
    configs = harness.config_paths(bundle_root, manifest["inference"]["config_files"], demo=False)
    for network_id, spec in manifest["networks"].items():
        data_format = metadata[spec["data_format"]]
        image, pred = data_format["inputs"]["image"], data_format["outputs"]["pred"]
        method = spec.get("method", "forward")
        if method == "forward":
            verify_net_in_out(
                net_id=network_id, meta_file=meta_file, config_file=configs, device="cpu",
                extra_forward_args=_fake_forward_args(spec), bundle_root=str(bundle_root),
                **{"_meta_#network_data_format": data_format},
            )  # fmt: skip
            continue
        parser = ConfigParser()
        parser.read_config(configs)
        network = parser.get_parsed_content(network_id).eval()
        with torch.no_grad():
            inputs = torch.rand(1, image["num_channels"], *image["spatial_shape"])
            output = getattr(network, method)(inputs, **_fake_forward_args(spec))
        assert output.shape[1] == pred["num_channels"], f"{network_id}.{method}: {output.shape[1]} channels"
        assert list(output.shape[2:]) == list(pred["spatial_shape"]), f"{network_id}.{method}: shape {output.shape}"
        assert str(output.dtype).replace("torch.", "") == pred["dtype"]


@pytest.mark.parametrize("bundle_root", BUNDLES, ids=BUNDLE_IDS)
def test_networks_export_to_torchscript_or_say_why_not(bundle_root, tmp_path):
    """The Model Zoo's export check: metadata's `torchscript` names each network "scripted" or "traced", and then
    MONAI's ckpt_export must write a TorchScript file that computes what the network computes; or it says why the
    network is "not exportable", and then scripting must indeed fail (so the note goes when the reason does)."""
    from monai.bundle import ConfigParser, ckpt_export

    manifest = harness.load_manifest(bundle_root)
    meta_file = str(bundle_root / "configs/metadata.json")
    metadata = json.loads(Path(meta_file).read_text())
    assert set(metadata.get("torchscript", {})) == set(
        manifest["networks"]
    ), "metadata.torchscript must name every network"
    configs = harness.config_paths(bundle_root, manifest["inference"]["config_files"], demo=False)
    for network_id, spec in manifest["networks"].items():
        parser = ConfigParser()
        parser.read_config(configs)
        network = parser.get_parsed_content(network_id).eval()
        how = metadata["torchscript"][network_id]
        if how.startswith("not exportable: "):
            with pytest.raises(Exception):
                torch.jit.script(network)
            continue
        assert how in ("scripted", "traced"), f"{network_id}: unknown torchscript note {how!r}"
        image = metadata[spec["data_format"]]["inputs"]["image"]
        shape = [1, image["num_channels"], *image["spatial_shape"]]
        torch.save(network.state_dict(), tmp_path / f"{network_id}.pt")
        ckpt_export(
            net_id=network_id, filepath=str(tmp_path / f"{network_id}.ts"), ckpt_file=str(tmp_path / f"{network_id}.pt"),
            meta_file=meta_file, config_file=configs, bundle_root=str(bundle_root), use_trace=how == "traced",
            input_shape=shape if how == "traced" else None,
        )  # fmt: skip
        exported = torch.jit.load(str(tmp_path / f"{network_id}.ts"))
        inputs = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(exported(inputs), network(inputs), rtol=1e-4, atol=1e-5)


# --- workflows run end to end through `python -m monai.bundle run`, on a copy of the bundle and tiny demo data ---


@pytest.fixture(scope="module", params=BUNDLES, ids=BUNDLE_IDS)
def trained_bundle(request, tmp_path_factory):
    """A copy of the bundle, its demo data (few subjects; a bundle asks for more with ``test_subjects`` where its
    splits need them, e.g. two per split for two torchrun ranks) and every training stage run for two iterations."""
    return harness.train_copy(request.param, tmp_path_factory.mktemp(request.param.name), TEST_OVERRIDES)


def test_training_stages_write_loadable_checkpoints(trained_bundle):
    bundle_root, manifest, _ = trained_bundle
    for stage in manifest["training"]:
        checkpoint = bundle_root / stage["checkpoint"]
        assert checkpoint.is_file(), f"stage {stage['name']} wrote no {stage['checkpoint']}"
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def _expected_output_format(bundle_root: Path, config_files: list[str], overrides: dict) -> tuple[int, list[int], str]:
    """Channels, spatial shape and dtype the post-processed output must have under the demo override."""
    manifest = harness.load_manifest(bundle_root)
    metadata = json.loads((bundle_root / "configs/metadata.json").read_text())
    declared = manifest["declared_shapes"]
    output = "network_data_format#post_processed_outputs#pred"
    channels_ref, shape_ref = declared[f"{output}#num_channels"], declared[f"{output}#spatial_shape"]
    values = harness.parse_config_values(bundle_root, config_files, [channels_ref[1:], shape_ref[1:]], overrides)
    dtype = metadata["network_data_format"]["post_processed_outputs"]["pred"]["dtype"]
    return int(values[channels_ref[1:]]), list(values[shape_ref[1:]]), dtype


def test_inference_writes_outputs_of_declared_shape_and_dtype(trained_bundle, tmp_path):
    bundle_root, manifest, dataset_dir = trained_bundle
    configs = harness.config_paths(bundle_root, manifest["inference"]["config_files"])
    overrides = dict(TEST_INFERENCE_OVERRIDES, dataset_dir=str(dataset_dir), output_dir=str(tmp_path))
    harness.run_workflow(bundle_root, configs, overrides=overrides, log_file=tmp_path / "inference.log")
    outputs = sorted(tmp_path.glob(manifest["inference"]["output_glob"]))
    assert len(outputs) == TEST_INFERENCE_OVERRIDES["num_samples"] * manifest["inference"].get("outputs_per_sample", 1)
    num_channels, spatial_shape, dtype = _expected_output_format(bundle_root, configs, overrides)
    harness.check_output_files(outputs, num_channels, spatial_shape, dtype)
    assert (tmp_path / manifest["inference"]["preview"]).is_file()
    synthetic = manifest["inference"].get("synthetic_datalist")
    if synthetic:  # a ready-to-train datalist of the outputs, for tools.utility
        entries = load_datalist(tmp_path / synthetic["file"], "training", synthetic["keys"])  # checks the files exist
        assert len(entries) == TEST_INFERENCE_OVERRIDES["num_samples"]


def test_evaluate_writes_report(trained_bundle, tmp_path):
    bundle_root, manifest, dataset_dir = trained_bundle
    configs = harness.config_paths(bundle_root, manifest["evaluate"]["config_files"])
    overrides = dict(TEST_INFERENCE_OVERRIDES, dataset_dir=str(dataset_dir), output_dir=str(tmp_path))
    overrides.update(manifest["evaluate"].get("test_overrides", {}))
    harness.run_workflow(bundle_root, configs, overrides=overrides, log_file=tmp_path / "evaluate.log")
    report = json.loads((tmp_path / manifest["evaluate"]["report"]).read_text())
    assert report, "empty evaluation report"


def test_benchmark_counts_each_samplers_network_calls(trained_bundle):
    """tools.benchmark on the trained bundle's own inference at 3 steps: DDIM makes 3 calls, Heun 2 * 3 - 1 (or the
    counts the bundle's benchmark entry declares for its own samplers, e.g. PC: a predictor and a corrector per level).
    """
    bundle_root, manifest, dataset_dir = trained_bundle
    if "benchmark" not in manifest:
        pytest.skip(f"{bundle_root.name} has no sampler to benchmark")
    expected = manifest["benchmark"].get("test_nfe", {"ddim": 3, "heun": 5})
    overrides = {"dataset_dir": str(dataset_dir), "num_threads": 1}
    result = benchmark.benchmark_bundle(bundle_root, list(expected), [3], 1, "cpu", overrides, warmup=0, repeats=1)
    assert [(row["sampler"], row["nfe"]) for row in result["rows"]] == list(expected.items())
    for row in result["rows"]:
        assert row["gflops_per_nfe"] > 0 and row["images_per_second"] > 0
        assert row["gflops_per_image"] >= row["nfe"] * row["gflops_per_nfe"] * 0.999
    sampler, nfe = list(expected.items())[-1]
    assert f"| {sampler} | 3 | {nfe} |" in benchmark.markdown_table(result)


def test_multi_gpu_override_runs_under_torchrun(trained_bundle, tmp_path):
    """Every training stage with multi_gpu_train.json: two gloo processes, one iteration each."""
    bundle_root, manifest, dataset_dir = trained_bundle
    for stage in manifest["training"]:
        files = stage["config_files"] + stage.get("multi_gpu_config_files", ["configs/multi_gpu_train.json"])
        overrides = dict(
            TEST_OVERRIDES, epoch_length=1, dataset_dir=str(dataset_dir), ckpt_dir=str(tmp_path / "models")
        )
        # later stages read the checkpoints of earlier ones from ckpt_dir; this stage's own must be written anew
        shutil.copytree(bundle_root / "models", tmp_path / "models", dirs_exist_ok=True)
        checkpoint = tmp_path / "models" / Path(stage["checkpoint"]).name
        checkpoint.unlink()
        harness.run_workflow(
            bundle_root, harness.config_paths(bundle_root, files), run_id="training", overrides=overrides,
            nproc_per_node=2, log_file=tmp_path / f"ddp_{stage['name']}.log",
        )  # fmt: skip
        assert checkpoint.is_file(), f"torchrun stage {stage['name']} wrote no {checkpoint.name}"


STANDALONE_BUNDLE = "brainspade_label_ldm"  # the check installs a fresh environment, so it runs for one bundle


def _serve(directory: Path):
    """An HTTP server for ``directory`` on 127.0.0.1 (a free port), in a thread; returns it (shut it down after)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_packaged_bundle_downloads_and_runs_standalone_in_a_fresh_environment(trained_bundle, tmp_path):
    """tools.package -> registry served on loopback -> `python -m monai.bundle download` into an empty folder ->
    inference from there, in a new virtual environment holding only torch and the packages in the archived
    metadata.json (not this repository); then a flipped byte in the weights is refused before they load."""
    bundle_root, manifest, dataset_dir = trained_bundle
    if bundle_root.name != STANDALONE_BUNDLE:
        pytest.skip(f"the standalone check runs for {STANDALONE_BUNDLE}")
    from tools import package

    entry = package.package_bundle(bundle_root, tmp_path / "dist", models_from=bundle_root.parent)
    assert "model.pt" in entry["weights"] and "medgen-bundles" not in entry["required_packages_version"]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={version}" for name, version in entry["required_packages_version"].items()]
    pins += [f"monai=={entry['monai_version']}", f"numpy=={entry['numpy_version']}"]
    for requirement in ([f"torch=={entry['pytorch_version']}"], pins):  # torch first: the CPU build on this disk
        subprocess.run([python, "-m", "pip", "install", "--quiet", *requirement], check=True, timeout=1200)
    env = {key: value for key, value in harness.worker_environment().items() if key != "PYTHONPATH"}

    server = _serve(tmp_path / "dist")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{entry['archive']}"
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        subprocess.run(
            [python, "-m", "monai.bundle", "download", "--name", bundle_root.name, "--url", url,
             "--bundle_dir", str(downloads)], check=True, env=env, cwd=downloads, timeout=300,
        )  # fmt: skip
    finally:
        server.shutdown()
    standalone = downloads / bundle_root.name
    assert (standalone / "models" / "checksums.json").is_file()
    where = subprocess.run(
        [python, "-c", "import medgen_common; print(medgen_common.__file__)"],
        check=True, env=env, cwd=standalone, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).resolve().is_relative_to(standalone.resolve()), where  # the vendored copy, not the repository

    configs = harness.config_paths(standalone, manifest["inference"]["config_files"])
    overrides = dict(TEST_INFERENCE_OVERRIDES, dataset_dir=str(dataset_dir), output_dir=str(tmp_path / "out"))
    command = [
        python,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(configs),
        "--meta_file",
        "configs/metadata.json",
        "--logging_file",
        "configs/logging.conf",
        "--bundle_root",
        ".",
    ]
    command += [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=standalone, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verified the SHA-256 of" in result.stdout + result.stderr
    outputs = sorted((tmp_path / "out").glob(manifest["inference"]["output_glob"]))
    assert len(outputs) == TEST_INFERENCE_OVERRIDES["num_samples"] * manifest["inference"].get("outputs_per_sample", 1)

    weights = standalone / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    result = subprocess.run(command, env=env, cwd=standalone, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert f"weights file '{weights.relative_to(standalone)}' has SHA-256" in result.stdout + result.stderr or (
        f"weights file '{weights}' has SHA-256" in result.stdout + result.stderr
    )


@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc PACS with DICOMweb on loopback, storing in a temporary folder; yields its DICOMweb root."""
    import socket
    import urllib.request

    executable = shutil.which("Orthanc")
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if executable is None or not plugin.is_file():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian: orthanc orthanc-dicomweb)")
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    storage = tmp_path / "orthanc"
    storage.mkdir()
    config = {
        "Name": "medgen-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": ports[0], "DicomPort": ports[1], "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "w")
    server = subprocess.Popen([executable, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{ports[0]}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{root}/system", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"Orthanc did not start: {(tmp_path / 'orthanc.log').read_text()[-2000:]}")
        yield f"{root}/dicom-web"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_pacs_round_trip_pulls_a_study_runs_inference_and_stores_a_synthetic_series(trained_bundle, orthanc, tmp_path):
    """A study pushed to Orthanc, pulled by WADO-RS, run through the bundle's inference by tools.pacs, stored back
    by STOW-RS as a new synthetic series, then queried back (QIDO-RS) and compared pixel by pixel and tag by tag."""
    bundle_root, manifest, dataset_dir = trained_bundle
    if "pacs" not in manifest:
        pytest.skip(f"{bundle_root.name} declares no PACS workflow")
    import pydicom
    from dicomweb_client.api import DICOMwebClient
    from monai.transforms import LoadImage

    from medgen_common.dicom_io import SyntheticSeries, write_dicom_series
    from tools import pacs

    entry = manifest["pacs"]
    source = load_datalist(dataset_dir / "datalist_2d.json", "test", [entry["input_key"]])[0][entry["input_key"]]
    image = LoadImage(image_only=True, ensure_channel_first=True, channel_dim=-1)(source)
    low, high = entry["input_value_range"]
    files = write_dicom_series(image * (high - low) + low, tmp_path / "clinical", SyntheticSeries("scanner", "1"),
                               entry["input_modality"])  # fmt: skip
    clinical = []
    for path in files:  # a named patient, as a PACS holds them
        dataset = pydicom.dcmread(path)
        dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = "Doe^Jane", "MRN-12345", "19700101"
        clinical.append(dataset)
    client = DICOMwebClient(url=orthanc)
    client.store_instances(clinical)
    study = clinical[0].StudyInstanceUID

    result = pacs.run(bundle_root, orthanc, study, work_dir=tmp_path / "work", demo=True,
                      overrides={"device_name": "cpu", "num_threads": 1})  # fmt: skip
    assert result["study"] != study and len(result["outputs"]) == 1
    ((output_name, stored),) = result["outputs"].items()

    found = client.search_for_series(study_instance_uid=result["study"])
    assert [item["0020000E"]["Value"][0] for item in found] == [stored["series"]]
    back = client.retrieve_series(result["study"], stored["series"])
    assert len(back) == len(stored["files"]) == 1
    dataset = back[0]
    assert dataset.SeriesDescription.startswith(f"SYNTHETIC {bundle_root.name} ")
    assert list(dataset.ImageType)[:2] == ["DERIVED", "SECONDARY"] and dataset.ConversionType == "SYN"
    assert str(dataset.PatientName) == f"SYNTHETIC^{bundle_root.name}" and "Doe" not in str(dataset)
    assert "MRN-12345" not in str(dataset) and dataset.SOPInstanceUID != clinical[0].SOPInstanceUID
    assert [float(v) for v in dataset.PixelSpacing] == pytest.approx(
        [float(v) for v in np.abs(np.diag(image.affine))[:2]][::-1]
    )
    written = pydicom.dcmread(stored["files"][0])
    np.testing.assert_array_equal(dataset.pixel_array, written.pixel_array)  # what was stored is what comes back
    produced = np.moveaxis(np.asarray(LoadImage(image_only=True)(tmp_path / "work" / "output" / output_name)), -1, 0)
    np.testing.assert_allclose(dataset.pixel_array.transpose(2, 1, 0) / 255.0, produced.reshape(3, *produced.shape[1:3]),
                               atol=0.5 / 255 + 1e-6)  # fmt: skip


def test_nfe_sweep_reports_quality_and_cost_against_the_reference(trained_bundle, tmp_path):
    """tools.nfe_sweep on the trained bundle's own evaluation: the reference row first, NFE as counted, each
    declared metric read from the report, and the relative change from the reference (zero for the reference); a
    reused reference row is not evaluated again."""
    bundle_root, manifest, dataset_dir = trained_bundle
    if "nfe_sweep" not in manifest:
        pytest.skip(f"{bundle_root.name} declares no NFE-sweep metrics")
    from tools import nfe_sweep

    overrides = dict(TEST_INFERENCE_OVERRIDES, dataset_dir=str(dataset_dir))
    overrides.update(manifest["evaluate"].get("test_overrides", {}))
    for key in ("num_inference_steps", "num_samples", "batch_size"):
        overrides.pop(key)
    first, second = list(manifest["benchmark"].get("test_nfe", {"ddim": 3, "dpmpp_2m": 3}))[:2]
    result = nfe_sweep.sweep(bundle_root, [first, second], [3, 2], first, 4, tmp_path, overrides, images=1)
    assert [(row["sampler"], row["steps"]) for row in result["rows"]] == [
        (first, 4), (first, 2), (first, 3), (second, 2), (second, 3),
    ]  # fmt: skip
    assert [row["nfe"] for row in result["rows"]][:3] == [4, 2, 3]
    for row in result["rows"]:
        report = json.loads(
            (tmp_path / f"{row['sampler']}_{row['steps']}" / manifest["evaluate"]["report"]).read_text()
        )
        expected = {
            label: float(harness.value_at(report, path.replace("{sampler}", row["sampler"])))
            for label, path in manifest["nfe_sweep"]["metrics"].items()
        }
        assert row["metrics"] == pytest.approx(expected, nan_ok=True)  # a class absent from the tiny test set is NaN
        assert row["images_per_second"] > 0
    assert all(value == 0 for value in result["rows"][0]["relative_change"].values())
    assert (tmp_path / "nfe_sweep.md").read_text().startswith("| sampler | steps | NFE | images/s |")
    again = nfe_sweep.sweep(bundle_root, [first], [2], out_dir=tmp_path / "again", overrides=overrides, images=1,
                            reference_row=result["rows"][0])  # fmt: skip
    assert not (tmp_path / "again" / f"{first}_4").exists()
    assert again["rows"][0]["metrics"] == pytest.approx(result["rows"][0]["metrics"], nan_ok=True)
    assert again["rows"][1]["relative_change"] == pytest.approx(result["rows"][1]["relative_change"], nan_ok=True)
