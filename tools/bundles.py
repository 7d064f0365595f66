"""Discover the bundles of the collection and run their workflows the way users do (``python -m monai.bundle run``).

Each bundle describes its workflows in ``configs/workflows.json`` (training stages in order, inference,
evaluation, demo data, networks and the metadata shapes that must follow from the configs). The test harness and
``make demo`` both drive bundles through this module, so a new bundle needs no new harness code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"

__all__ = [
    "REPO_ROOT",
    "BUNDLES_DIR",
    "BundleRunError",
    "discover_bundles",
    "load_manifest",
    "config_paths",
    "run_workflow",
    "parse_config_values",
    "declared_shape_mismatches",
    "worker_environment",
    "validate_metadata",
    "make_demo_dataset",
    "check_output_files",
]


class BundleRunError(RuntimeError):
    """A bundle workflow exited with an error; the message holds the command and the end of its output."""


def discover_bundles(bundles_dir: Path = BUNDLES_DIR) -> list[Path]:
    """Every folder under ``bundles/`` holding ``configs/metadata.json``, sorted by name."""
    return sorted(path.parent.parent for path in bundles_dir.glob("*/configs/metadata.json"))


def load_manifest(bundle_root: Path) -> dict:
    """Read ``configs/workflows.json`` of a bundle."""
    path = Path(bundle_root) / "configs" / "workflows.json"
    if not path.is_file():
        raise FileNotFoundError(f"bundle '{bundle_root}' has no configs/workflows.json describing its workflows.")
    return json.loads(path.read_text())


def config_paths(bundle_root: Path, config_files: Sequence[str], demo: bool = True) -> list[str]:
    """Absolute config paths of a workflow, with the bundle's demo override appended when ``demo``."""
    bundle_root = Path(bundle_root)
    files = list(config_files)
    if demo:
        files.append(load_manifest(bundle_root)["demo_override"])
    return [str(bundle_root / name) for name in files]


def worker_environment(num_threads: int = 1) -> dict:
    """Environment for workflow subprocesses: few CPU threads without OpenMP spin-waiting (see README)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(num_threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("MEDGEN_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


def _format_override(value) -> str:
    """A config override as ``monai.bundle run`` (python-fire) reads it back: Python literals, so ``False`` stays a
    bool (fire would read JSON's ``false`` as the string 'false', which is truthy)."""
    return repr(value) if isinstance(value, (list, dict, tuple, bool)) or value is None else str(value)


def parse_overrides(pairs: list[str]) -> dict:
    """``["epochs=5", "device_name=cpu"]`` -> ``{"epochs": 5, "device_name": "cpu"}`` (values read as JSON when they
    parse, as strings otherwise)."""
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"override '{pair}' is not KEY=VALUE.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def workflow_command(
    bundle_root: Path,
    config_files: Sequence[str],
    run_id: str = "run",
    overrides: Mapping | None = None,
    nproc_per_node: int | None = None,
) -> list[str]:
    """The ``python -m monai.bundle run`` command line :func:`run_workflow` runs (in ``bundle_root``)."""
    bundle_root = Path(bundle_root).resolve()
    config_files = [str(Path(path).resolve()) for path in config_files]
    command = [sys.executable, "-m"]
    if nproc_per_node:
        command += [
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc_per_node),
            "-m",
        ]
    command += [
        "monai.bundle", "run", run_id,
        "--meta_file", str(bundle_root / "configs" / "metadata.json"),
        "--config_file", json.dumps([str(path) for path in config_files]),
        "--logging_file", str(bundle_root / "configs" / "logging.conf"),
        "--bundle_root", str(bundle_root),
    ]  # fmt: skip
    for key, value in (overrides or {}).items():
        command += [f"--{key}", _format_override(value)]
    return command


def run_workflow(
    bundle_root: Path,
    config_files: Sequence[str],
    run_id: str = "run",
    overrides: Mapping | None = None,
    nproc_per_node: int | None = None,
    log_file: Path | None = None,
    timeout: float | None = None,
    env: Mapping | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <run_id>`` on a bundle (or under ``torchrun`` with ``nproc_per_node``).

    Args:
        bundle_root: the bundle folder (a copy, when the run must not write into the repository).
        config_files: absolute config paths, merged in order.
        run_id: workflow entry (``run``, ``training``, ...).
        overrides: ``--key value`` pairs; lists, dicts, booleans and None are passed as Python literals.
        nproc_per_node: run with ``torch.distributed.run`` and this many processes.
        log_file: write the combined output here while the workflow runs (otherwise it is captured).

    Raises:
        BundleRunError: non-zero exit, with the command and the last 60 lines of output.
    """
    bundle_root = Path(bundle_root).resolve()  # the workflow runs in the bundle folder: no relative paths
    command = workflow_command(bundle_root, config_files, run_id, overrides, nproc_per_node)
    environment = dict(env or worker_environment())
    if log_file is None:
        result = subprocess.run(
            command, cwd=bundle_root, env=environment, capture_output=True, text=True, timeout=timeout
        )
        output = result.stdout + result.stderr
    else:  # written as it runs, so long runs can be followed with `tail -f`
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as stream:
            result = subprocess.run(
                command, cwd=bundle_root, env=environment, stdout=stream, stderr=subprocess.STDOUT, timeout=timeout
            )
        output = Path(log_file).read_text(errors="replace")
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-60:])
        raise BundleRunError(f"workflow failed (exit {result.returncode}): {' '.join(command)}\n{tail}")
    return result


def parse_config_values(
    bundle_root: Path, config_files: Sequence[str], ids: Sequence[str], overrides: Mapping | None = None
) -> dict:
    """Parse configs in-process (as ``monai.bundle`` would) and return the evaluated content of each id."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.read_meta(str(Path(bundle_root) / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_root)
    for key, value in (overrides or {}).items():
        parser[key] = value
    return {identifier: parser.get_parsed_content(identifier) for identifier in ids}


def value_at(content: Mapping, path: str):
    """The value at a ``#``-separated path of nested mappings (MONAI's id separator), e.g. in metadata or a report."""
    value = content
    for part in path.split("#"):
        value = value[part]
    return value


def declared_shape_mismatches(
    bundle_root: Path, config_files: Sequence[str], overrides: Mapping | None = None
) -> list[str]:
    """Compare the shapes ``metadata.json`` declares with the values the configs give (``declared_shapes`` in the
    manifest maps metadata paths to config references). Returns one message per mismatch."""
    bundle_root = Path(bundle_root)
    metadata = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    declared = load_manifest(bundle_root).get("declared_shapes", {})
    values = parse_config_values(bundle_root, config_files, [ref.lstrip("@") for ref in declared.values()], overrides)
    mismatches = []
    for path, reference in declared.items():
        expected = values[reference.lstrip("@")]
        stated = value_at(metadata, path)
        if json.loads(json.dumps(stated)) != json.loads(json.dumps(expected)):
            mismatches.append(f"metadata '{path}' is {stated} but the config gives {reference} = {expected}")
    return mismatches


PROJECT_METADATA_SCHEMA = REPO_ROOT / "tools" / "schemas" / "bundle_metadata.schema.json"
OFFICIAL_METADATA_SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"


def validate_metadata(bundle_root: Path, schema_path: Path = PROJECT_METADATA_SCHEMA) -> dict:
    """Validate ``configs/metadata.json`` against the project's schema and check that ``version`` is in the
    changelog. Returns the metadata.

    Raises:
        jsonschema.ValidationError: the metadata breaks the schema (the message names the field).
        ValueError: the version has no changelog entry.
    """
    import jsonschema

    metadata = json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(Path(schema_path).read_text()))
    if metadata["version"] not in metadata["changelog"]:
        raise ValueError(f"version {metadata['version']} of '{bundle_root}' has no changelog entry.")
    return metadata


def make_demo_dataset(demo_data: Mapping, out_dir: Path, num_subjects: int | None = None, seed: int = 0) -> Path:
    """Generate a bundle's demo data (``demo_data`` entry of its manifest) and return its ``dataset_dir``."""
    from medgen_common.demo_data import GENERATORS

    modality = demo_data["modality"]
    if modality not in GENERATORS:
        raise ValueError(f"no demo-data generator for modality '{modality}'; known: {sorted(GENERATORS)}.")
    GENERATORS[modality](out_dir, n_subjects=num_subjects or demo_data["subjects"], seed=seed)
    return Path(out_dir) / demo_data["dataset_subdir"]


def train_copy(
    source: Path, work: Path, overrides: Mapping, num_subjects: int | None = None
) -> tuple[Path, dict, Path]:
    """Copy a bundle into ``work`` (without models or outputs), generate its demo data there (``num_subjects``, or the
    manifest's ``test_subjects``, default 4) and run every training stage with ``overrides`` (e.g. two iterations);
    returns the copy's root, its manifest and the dataset folder. The tests' trained bundles come from here."""
    manifest = load_manifest(source)
    bundle_root = Path(work) / source.name
    shutil.copytree(source, bundle_root, ignore=shutil.ignore_patterns("models", "eval", "output"))
    subjects = num_subjects or manifest["demo_data"].get("test_subjects", 4)
    dataset_dir = make_demo_dataset(manifest["demo_data"], Path(work) / "data", num_subjects=subjects)
    for stage in manifest["training"]:
        run_workflow(
            bundle_root, config_paths(bundle_root, stage["config_files"]), run_id="training",
            overrides={**overrides, "dataset_dir": str(dataset_dir)}, log_file=Path(work) / f"train_{stage['name']}.log",
        )  # fmt: skip
    return bundle_root, manifest, dataset_dir


def check_output_files(paths: Sequence[Path], num_channels: int, spatial_shape: Sequence[int], dtype: str) -> None:
    """Check written NIfTI outputs (channel last on disk) against the declared channels, spatial shape and dtype.

    Raises:
        AssertionError: naming the file and what differs.
    """
    import nibabel as nib

    for path in paths:
        image = nib.load(str(path))
        shape = list(image.shape)
        expected = list(spatial_shape) + ([1] if len(spatial_shape) == 2 else []) + [num_channels]
        if num_channels == 1 and len(shape) == len(expected) - 1:
            expected = expected[:-1]
        assert (
            shape == expected
        ), f"'{path}' has shape {shape}, declared {expected} (spatial {list(spatial_shape)}, {num_channels} channels)"
        assert str(image.get_data_dtype()) == dtype, f"'{path}' is {image.get_data_dtype()}, declared {dtype}"
