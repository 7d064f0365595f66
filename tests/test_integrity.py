"""Tests of medgen_common.integrity: SHA-256 checks of weights and archives, and safe all-or-nothing extraction."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile

import pytest

from medgen_common.integrity import (
    CHECKSUM_FILE,
    IntegrityError,
    extract_archive,
    sha256_file,
    verify_checksums,
    write_checksums,
)


def test_sha256_matches_hashlib_across_chunk_boundaries(tmp_path):
    payload = bytes(range(256)) * 5000  # 1.28 MB: several 64 KiB chunks
    path = tmp_path / "weights.pt"
    path.write_bytes(payload)
    assert sha256_file(path, chunk_bytes=1 << 16) == hashlib.sha256(payload).hexdigest()


def test_a_bundle_without_checksums_verifies_nothing(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"trained here")
    assert verify_checksums(tmp_path) == []


def test_published_weights_pass_and_a_changed_byte_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"published weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "autoencoder.pt").write_bytes(b"stage one")
    write_checksums(tmp_path, ["model.pt", "sub/autoencoder.pt"])
    assert verify_checksums(tmp_path) == ["model.pt", "sub/autoencoder.pt"]

    (tmp_path / "model.pt").write_bytes(b"published weightz")
    with pytest.raises(IntegrityError) as info:
        verify_checksums(tmp_path)
    expected = hashlib.sha256(b"published weights").hexdigest()
    actual = hashlib.sha256(b"published weightz").hexdigest()
    assert str(info.value) == (
        f"weights file '{tmp_path / 'model.pt'}' has SHA-256 {actual}, but {expected} was published: the file is "
        "corrupt, truncated or not the published one. Download it again from a source you trust. (If you retrained "
        f"this bundle yourself, delete '{tmp_path / CHECKSUM_FILE}'.)"
    )


def test_a_listed_file_that_is_missing_is_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"w")
    write_checksums(tmp_path, ["model.pt"])
    (tmp_path / "model.pt").unlink()
    with pytest.raises(IntegrityError, match="model.pt' is listed in .* but missing; the bundle is incomplete"):
        verify_checksums(tmp_path)


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_archive_checks_the_checksum_and_extracts_all(tmp_path):
    archive = _zip(tmp_path / "bundle.zip", {"b/configs/inference.json": b"{}", "b/models/model.pt": b"w"})
    out = extract_archive(archive, tmp_path / "out", sha256=sha256_file(archive))
    assert (out / "b" / "configs" / "inference.json").read_bytes() == b"{}"
    assert (out / "b" / "models" / "model.pt").read_bytes() == b"w"


def test_extract_archive_refuses_a_wrong_checksum_and_writes_nothing(tmp_path):
    archive = _zip(tmp_path / "bundle.zip", {"b/x": b"1"})
    with pytest.raises(
        IntegrityError, match=r"archive '.*bundle.zip' has SHA-256 [0-9a-f]{64}, but 0{64} was published"
    ):
        extract_archive(archive, tmp_path / "out", sha256="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.zip"]


@pytest.mark.parametrize("evil", ["../escaped.txt", "b/../../escaped.txt", "/tmp/absolute.txt"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_extract_archive_refuses_dot_dot_and_absolute_members_and_leaves_nothing(tmp_path, evil, kind):
    archive = tmp_path / f"bundle.{kind}"
    members = {"b/configs/inference.json": b"{}", evil: b"pwned"}
    if kind == "zip":
        _zip(archive, members)
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(IntegrityError) as info:
        extract_archive(archive, tmp_path / "out")
    assert str(info.value).startswith(f"archive '{archive}' is unsafe to extract: Unsafe path detected in archive: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # no partial folder, nothing escaped


def test_extract_archive_refuses_an_existing_destination(tmp_path):
    archive = _zip(tmp_path / "bundle.zip", {"b/x": b"1"})
    (tmp_path / "out").mkdir()
    with pytest.raises(IntegrityError, match="already exists"):
        extract_archive(archive, tmp_path / "out")
