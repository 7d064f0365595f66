"""Package bundles as standalone, versioned archives with an offline registry, and fetch them back, verified.

    python -m tools.package build --out dist [--bundles spade_vaegan ...] [--models-from demo]
    python -m tools.package fetch --registry dist/registry.json --name spade_vaegan --bundle-dir bundles_in_use

``build`` writes ``dist/<name>_<version>.zip`` for each bundle: ``<name>/`` with its configs, docs and LICENSE, a
vendored copy of ``medgen_common`` (so the bundle needs only the pip packages its ``metadata.json`` lists; the
archived metadata adds the ones the vendored code imports), and its weights when ``--models-from`` has them
(``<dir>/<name>/bundle/models`` as ``make demo`` leaves them, or ``<dir>/<name>/models``) with
``models/checksums.json``. Archives are reproducible (sorted members, fixed time stamps) and written atomically.
``dist/registry.json`` lists name, version, archive, SHA-256 and required packages; MONAI downloads from it
offline with

    python -m monai.bundle download --name spade_vaegan --url file:///abs/dist/spade_vaegan_0.1.3.zip --bundle_dir D

(or ``--url http://127.0.0.1:8000/spade_vaegan_0.1.3.zip`` with ``python -m http.server`` in ``dist``).
``fetch`` does the same from the registry (a path or an http URL) and also checks the archive's SHA-256 and
refuses unsafe members before anything is extracted. Either way, every workflow of the bundle checks its weights
against ``models/checksums.json`` before it loads them. Run the bundle from its folder (MONAI puts the working
directory first on the import path, so the vendored ``medgen_common`` is the one used).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from medgen_common.integrity import CHECKSUM_FILE, extract_archive, sha256_file, write_checksums
from medgen_common.writers import atomic_path, write_json
from tools import bundles as harness

COMMON_PACKAGE = Path(__file__).resolve().parents[1] / "common" / "medgen_common"
PROJECT_DISTRIBUTION = "medgen-bundles"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
WEIGHT_SUFFIXES = (".pt", ".ts", ".json")


def vendored_requirements(package_dir: Path = COMMON_PACKAGE) -> dict[str, str]:
    """The pip distributions (at their installed versions) that ``package_dir`` imports at module level, found by
    parsing its source; torch, MONAI and NumPy are left out (metadata.json names them on their own)."""
    modules = set()
    for source in package_dir.rglob("*.py"):
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    distributions = importlib.metadata.packages_distributions()
    required = {}
    for module in sorted(modules - set(sys.stdlib_module_names) - {"__future__", "torch", "monai", "numpy"}):
        for distribution in distributions.get(module, []):
            required[distribution] = importlib.metadata.version(distribution)
    return required


def _models_dir(models_from: Path | None, name: str) -> Path | None:
    if models_from is None:
        return None
    for candidate in (models_from / name / "bundle" / "models", models_from / name / "models"):
        if candidate.is_dir():
            return candidate
    return None


def _zip_directory(source: Path, archive: Path) -> None:
    """Zip ``source``'s parent-relative tree (``<name>/...``) reproducibly, atomically."""
    files = sorted(path for path in source.rglob("*") if path.is_file())
    with atomic_path(archive) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in files:
            info = zipfile.ZipInfo(str(path.relative_to(source.parent)), date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zipped.writestr(info, path.read_bytes())


def package_bundle(bundle_dir: Path, out_dir: Path, models_from: Path | None = None) -> dict:
    """Write ``out_dir/<name>_<version>.zip`` for the bundle at ``bundle_dir``; return its registry entry."""
    bundle_dir, name = Path(bundle_dir), Path(bundle_dir).name
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    version = metadata["version"]
    required = dict(metadata.get("required_packages_version", {}))
    required.pop(PROJECT_DISTRIBUTION, None)  # vendored instead
    required.update({key: value for key, value in vendored_requirements().items() if key not in required})
    required.setdefault("fire", importlib.metadata.version("fire"))  # MONAI's command line runs on it
    metadata["required_packages_version"] = dict(sorted(required.items()))
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging) / name
        shutil.copytree(bundle_dir / "configs", root / "configs")
        shutil.copytree(bundle_dir / "docs", root / "docs")
        shutil.copy2(bundle_dir / "LICENSE", root / "LICENSE")
        shutil.copytree(COMMON_PACKAGE, root / "medgen_common", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        write_json(metadata, root / "configs" / "metadata.json")
        weights = []
        source_models = _models_dir(models_from, name)
        if source_models is not None:
            (root / "models").mkdir()
            for path in sorted(source_models.iterdir()):
                if path.suffix in WEIGHT_SUFFIXES and "training_state" not in path.name and path.name != CHECKSUM_FILE:
                    shutil.copy2(path, root / "models" / path.name)
                    weights.append(path.name)
            write_checksums(root / "models", weights)
        archive = Path(out_dir) / f"{name}_{version}.zip"
        _zip_directory(root, archive)
    return {
        "name": name,
        "version": version,
        "archive": archive.name,
        "sha256": sha256_file(archive),
        "size_bytes": archive.stat().st_size,
        "weights": weights,
        "monai_version": metadata.get("monai_version"),
        "pytorch_version": metadata.get("pytorch_version"),
        "numpy_version": metadata.get("numpy_version"),
        "required_packages_version": metadata["required_packages_version"],
    }


def build(out_dir: Path, names: list[str] | None = None, models_from: Path | None = None) -> Path:
    """Package the named bundles (default all) into ``out_dir`` and write ``out_dir/registry.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle_dirs = [harness.BUNDLES_DIR / name for name in names] if names else harness.discover_bundles()
    entries = []
    for bundle_dir in bundle_dirs:
        entries.append(package_bundle(bundle_dir, out_dir, models_from))
        print(f"{entries[-1]['archive']}  sha256 {entries[-1]['sha256']}  weights {entries[-1]['weights']}", flush=True)
    return write_json({"format": "medgen-bundles registry 1", "bundles": entries}, out_dir / "registry.json")


def _read(location: str) -> bytes:
    """Bytes at a local path or a file:// / http(s):// URL."""
    if urllib.parse.urlparse(location).scheme in ("http", "https", "file"):
        with urllib.request.urlopen(location, timeout=60) as response:
            return response.read()
    return Path(location).read_bytes()


def fetch(registry: str, name: str, bundle_dir: Path, version: str | None = None) -> Path:
    """Download bundle ``name`` (latest or ``version``) listed in ``registry``, check its SHA-256 and extract it
    safely to ``bundle_dir/<name>``; returns that folder."""
    index = json.loads(_read(registry))
    matches = [entry for entry in index["bundles"] if entry["name"] == name and version in (None, entry["version"])]
    if not matches:
        listed = sorted({(entry["name"], entry["version"]) for entry in index["bundles"]})
        wanted = f"'{name}'" + (f" version {version}" if version else "")
        raise ValueError(f"{wanted} is not in the registry {registry}; it lists {listed}.")
    entry = max(matches, key=lambda item: tuple(int(part) for part in item["version"].split(".")))
    base = registry.rsplit("/", 1)[0] if "://" in registry else str(Path(registry).parent)
    location = f"{base}/{entry['archive']}"
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bundle_dir) as download:
        archive = Path(download) / entry["archive"]
        archive.write_bytes(_read(location))
        extracted = extract_archive(archive, Path(download) / "extracted", sha256=entry["sha256"])
        target = bundle_dir / name
        if target.exists():
            raise FileExistsError(f"'{target}' already exists; remove it or fetch into another folder.")
        (extracted / name).rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="package bundles and write the registry")
    build_parser.add_argument("--out", type=Path, default=Path("dist"))
    build_parser.add_argument("--bundles", nargs="*", default=None)
    build_parser.add_argument("--models-from", type=Path, default=None, help="e.g. demo (after make demo)")
    fetch_parser = commands.add_parser("fetch", help="download, verify and extract a bundle from a registry")
    fetch_parser.add_argument("--registry", required=True, help="registry.json: a path or an http(s) URL")
    fetch_parser.add_argument("--name", required=True)
    fetch_parser.add_argument("--version", default=None)
    fetch_parser.add_argument("--bundle-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(args.out, args.bundles, args.models_from))
    else:
        print(fetch(args.registry, args.name, args.bundle_dir, args.version))


if __name__ == "__main__":
    main()
