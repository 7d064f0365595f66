"""SHA-256 checks of a bundle's weights and archives, and safe, all-or-nothing extraction of bundle archives.

A packaged bundle carries ``models/checksums.json`` (``{"model.pt": "<sha256 hex>", ...}``, written by
``tools.package``); every workflow verifies the files it lists before it loads anything
(:func:`verify_checksums` in the configs' ``initialize``). A bundle trained locally has no such file, so there is
nothing to check: its weights are the user's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from monai.apps.utils import extractall

from .writers import write_json

__all__ = ["CHECKSUM_FILE", "IntegrityError", "sha256_file", "write_checksums", "verify_checksums", "extract_archive"]

CHECKSUM_FILE = "checksums.json"

logger = logging.getLogger(__name__)


class IntegrityError(ValueError):
    """A file does not match its published SHA-256, or an archive is unsafe to extract."""


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise IntegrityError(
            f"{what} '{path}' has SHA-256 {actual}, but {expected.lower()} was published: the file is corrupt, "
            "truncated or not the published one. Download it again from a source you trust."
        )


def write_checksums(directory: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write ``directory/checksums.json`` with the SHA-256 of each named file (paths relative to ``directory``)."""
    directory = Path(directory)
    return write_json({name: sha256_file(directory / name) for name in sorted(names)}, directory / CHECKSUM_FILE)


def verify_checksums(directory: str | os.PathLike) -> list[str]:
    """Check every file listed in ``directory/checksums.json`` against its SHA-256; return the names checked
    (none when the bundle has no checksum file, e.g. one trained locally).

    Raises:
        IntegrityError: a listed file is missing or differs (the message names it and both digests). A bundle
            retrained in place no longer holds its published weights: delete ``checksums.json`` then.
    """
    directory = Path(directory)
    listing = directory / CHECKSUM_FILE
    if not listing.is_file():
        return []
    try:
        expected = json.loads(listing.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"'{listing}' is not valid JSON ({err}); the bundle is damaged.") from err
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"'{path}' is listed in '{listing}' but missing; the bundle is incomplete.")
        try:
            _check(path, digest, "weights file")
        except IntegrityError as err:
            raise IntegrityError(f"{err} (If you retrained this bundle yourself, delete '{listing}'.)") from None
    logger.info(f"verified the SHA-256 of {len(expected)} file(s) in '{directory}'")
    return sorted(expected)


def extract_archive(archive: str | os.PathLike, destination: str | os.PathLike, sha256: str | None = None) -> Path:
    """Extract a ``.zip`` / ``.tar`` / ``.tar.gz`` bundle archive into ``destination`` (which must not exist yet),
    all or nothing: the archive's SHA-256 is checked first, members with absolute paths, ``..`` or links are
    refused (MONAI's ``extractall``), and the files land in a temporary folder renamed into place at the end.

    Raises:
        IntegrityError: the checksum differs, a member is unsafe (nothing is written then), or ``destination``
            exists.
    """
    archive, destination = Path(archive), Path(destination)
    if destination.exists():
        raise IntegrityError(f"'{destination}' already exists; extract into a new folder.")
    if sha256 is not None:
        _check(archive, sha256, "archive")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        extractall(archive, staging, has_base=False)
        os.replace(staging, destination)
    except ValueError as err:  # MONAI's safe_extract_member
        raise IntegrityError(f"archive '{archive}' is unsafe to extract: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination
