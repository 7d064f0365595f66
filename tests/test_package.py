"""tools.package: reproducible bundle archives with vendored shared code and checksummed weights, a registry, and a
fetch that verifies the archive before extracting it."""

from __future__ import annotations

import json
import zipfile

import pytest

from medgen_common.integrity import IntegrityError, verify_checksums
from tools import bundles as harness
from tools import package

BUNDLE = harness.BUNDLES_DIR / "virtual_elastography_gan"


@pytest.fixture
def weights_dir(tmp_path):
    models = tmp_path / "trained" / BUNDLE.name / "bundle" / "models"  # as `make demo` leaves them
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(b"generator weights")
    (models / "colour_prior.json").write_text("{}")
    (models / "generator_training_state.pt").write_bytes(b"not shipped")
    return tmp_path / "trained"


def test_archive_holds_the_bundle_vendored_code_and_checksummed_weights(tmp_path, weights_dir):
    entry = package.package_bundle(BUNDLE, tmp_path / "dist", models_from=weights_dir)
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert entry["archive"] == f"{BUNDLE.name}_{metadata['version']}.zip"
    assert entry["weights"] == ["colour_prior.json", "model.pt"]  # training states stay behind
    with zipfile.ZipFile(tmp_path / "dist" / entry["archive"]) as archive:
        names = set(archive.namelist())
        packaged_metadata = json.loads(archive.read(f"{BUNDLE.name}/configs/metadata.json"))
    assert {f"{BUNDLE.name}/{name}" for name in ("LICENSE", "docs/README.md", "configs/inference.json")} <= names
    assert f"{BUNDLE.name}/medgen_common/integrity.py" in names and not any("__pycache__" in n for n in names)
    assert f"{BUNDLE.name}/models/generator_training_state.pt" not in names
    required = packaged_metadata["required_packages_version"]
    assert "medgen-bundles" not in required and {"scipy", "nibabel", "pytorch-ignite", "fire"} <= set(required)
    assert entry["required_packages_version"] == required

    extracted = tmp_path / "x"
    zipfile.ZipFile(tmp_path / "dist" / entry["archive"]).extractall(extracted)
    assert verify_checksums(extracted / BUNDLE.name / "models") == ["colour_prior.json", "model.pt"]


def test_archives_are_reproducible(tmp_path, weights_dir):
    first = package.package_bundle(BUNDLE, tmp_path / "a", models_from=weights_dir)
    second = package.package_bundle(BUNDLE, tmp_path / "b", models_from=weights_dir)
    assert first["sha256"] == second["sha256"]


def test_vendored_requirements_are_the_shared_codes_module_level_imports():
    required = package.vendored_requirements()
    assert {"scipy", "nibabel", "pillow", "pytorch-ignite"} <= set(required)
    assert not {"torch", "monai", "numpy", "medgen-bundles"} & set(required)


def test_fetch_verifies_and_extracts_and_refuses_a_tampered_archive(tmp_path, weights_dir):
    registry = package.build(tmp_path / "dist", [BUNDLE.name], models_from=weights_dir)
    index = json.loads(registry.read_text())
    assert [entry["name"] for entry in index["bundles"]] == [BUNDLE.name]
    folder = package.fetch(str(registry), BUNDLE.name, tmp_path / "installed")
    assert (folder / "configs" / "inference.json").is_file() and (folder / "models" / "model.pt").is_file()
    with pytest.raises(
        ValueError, match=r"'spade_vaegan' is not in the registry .* it lists \[\('virtual_elastography"
    ):
        package.fetch(str(registry), "spade_vaegan", tmp_path / "other")

    archive = tmp_path / "dist" / index["bundles"][0]["archive"]
    archive.write_bytes(archive.read_bytes() + b"\0")  # appended byte: a different file
    with pytest.raises(IntegrityError, match="archive .* has SHA-256 .* was published"):
        package.fetch(str(registry), BUNDLE.name, tmp_path / "again")
    assert not (tmp_path / "again" / BUNDLE.name).exists()
