"""Loading MONAI datalists (``{"training": [...], "validation": [...]}``) with errors that name the entry."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib

__all__ = [
    "DatalistError",
    "load_datalist",
    "load_label_datalist",
    "check_consistent_shapes",
    "check_channel_count",
    "make_style_pairs",
    "expand_sequences",
]


class DatalistError(ValueError):
    """A datalist is missing, malformed, or points at files that do not exist."""


def load_datalist(
    datalist_path: str | Path,
    split: str = "training",
    required_keys: Sequence[str] = ("image",),
    base_dir: str | Path | None = None,
    check_files: bool = True,
) -> list[dict]:
    """Read one split of a datalist JSON and resolve file paths.

    Relative paths are resolved against ``base_dir`` (default: the datalist's folder), as MONAI's
    ``load_decathlon_datalist`` does, and may not climb out of it with ``..``; absolute paths are taken as given. Values of ``required_keys`` are file paths; other keys are passed through.

    Args:
        datalist_path: path of the JSON file.
        split: top-level key to read, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        required_keys: keys every entry must have; their values are paths (or lists of paths).
        base_dir: folder relative paths are resolved against.
        check_files: raise when a referenced file does not exist.

    Returns:
        list of entries (new dicts) with absolute paths for ``required_keys``.

    Raises:
        DatalistError: the file is missing or not JSON, the split is absent or empty, an entry is not a dict,
            misses a key, names a file that does not exist, or a relative path outside ``base_dir``. The message names the entry index and key.
    """
    datalist_path = Path(datalist_path)
    if not datalist_path.is_file():
        raise DatalistError(f"datalist file not found: '{datalist_path}'.")
    try:
        content = json.loads(datalist_path.read_text())
    except json.JSONDecodeError as err:
        raise DatalistError(f"datalist '{datalist_path}' is not valid JSON: {err}.") from err
    if not isinstance(content, dict):
        raise DatalistError(f"datalist '{datalist_path}' must be a JSON object with split keys, got {type(content).__name__}.")
    if split not in content:
        available = [k for k, v in content.items() if isinstance(v, list)]
        raise DatalistError(f"datalist '{datalist_path}' has no '{split}' list (lists present: {available}).")
    entries = content[split]
    if not isinstance(entries, list) or len(entries) == 0:
        raise DatalistError(f"datalist '{datalist_path}': split '{split}' is empty or not a list.")

    base_dir = Path(base_dir) if base_dir is not None else datalist_path.parent
    resolved = []
    for index, entry in enumerate(entries):
        where = f"datalist '{datalist_path}', {split}[{index}]"
        if not isinstance(entry, dict):
            raise DatalistError(f"{where}: entry must be an object, got {type(entry).__name__}.")
        missing = [key for key in required_keys if key not in entry]
        if missing:
            raise DatalistError(f"{where}: missing key(s) {missing}; entry has {sorted(entry)}.")
        item = dict(entry)
        for key in required_keys:
            paths = item[key] if isinstance(item[key], list) else [item[key]]
            absolute = []
            for value in paths:
                if not isinstance(value, str) or not value:
                    raise DatalistError(f"{where}: key '{key}' must be a file path, got {value!r}.")
                path = Path(value) if Path(value).is_absolute() else base_dir / value
                if not Path(value).is_absolute() and os.path.normpath(value).split(os.sep)[0] == os.pardir:
                    raise DatalistError(
                        f"{where}: key '{key}' path '{value}' points outside the dataset root '{base_dir}'; relative "
                        "paths must stay inside it (give an absolute path to use a file elsewhere)."
                    )
                if check_files and not path.exists():
                    raise DatalistError(f"{where}: file for key '{key}' does not exist: '{path}'.")
                absolute.append(str(path))
            item[key] = absolute if isinstance(item[key], list) else absolute[0]
        resolved.append(item)
    return resolved


def check_consistent_shapes(entries: Sequence[dict], key: str, channel_last: bool = True) -> tuple[int, ...]:
    """Check that the NIfTI files under ``key`` share one shape (read from headers only) and return it.

    Args:
        entries: resolved datalist entries.
        key: entry key holding NIfTI paths.
        channel_last: only used in the message: the last axis is reported as the channel count.

    Raises:
        DatalistError: a file cannot be read as NIfTI, or its shape differs from the first entry's.
    """
    reference_shape: tuple[int, ...] | None = None
    reference_path = ""
    for index, entry in enumerate(entries):
        path = entry[key]
        try:
            shape = tuple(int(s) for s in nib.load(path).shape)
        except Exception as err:  # nibabel raises several types for corrupt files
            raise DatalistError(f"entry {index}: cannot read '{key}' file '{path}': {err}.") from err
        if reference_shape is None:
            reference_shape, reference_path = shape, path
        elif shape != reference_shape:
            what = "channel count" if channel_last and shape[:-1] == reference_shape[:-1] else "shape"
            raise DatalistError(
                f"entry {index}: '{key}' file '{path}' has {what} {shape}, but '{reference_path}' has {reference_shape}."
            )
    if reference_shape is None:
        raise DatalistError("no entries to check.")
    return reference_shape


def check_channel_count(entries: Sequence[dict], key: str, channel_names: Sequence[str]) -> tuple[int, ...]:
    """Check that the channel-last NIfTI files under ``key`` all have one shape with ``len(channel_names)`` channels.

    Raises:
        DatalistError: shapes differ between files, or the channel count is not the configured one.
    """
    shape = check_consistent_shapes(entries, key)
    if shape[-1] != len(channel_names):
        raise DatalistError(
            f"'{key}' files have {shape[-1]} channels (last axis of shape {shape}, e.g. '{entries[0][key]}'), "
            f"but the configuration names {len(channel_names)}: {list(channel_names)}."
        )
    return shape


def load_label_datalist(
    datalist_path: str | Path,
    split: str,
    channel_names: Sequence[str],
    label_key: str = "label",
    other_keys: Sequence[str] = (),
) -> list[dict]:
    """:func:`load_datalist` for probabilistic label maps: the files under ``label_key`` must share one shape with
    ``len(channel_names)`` channels last (checked from the headers, before any training starts).

    Raises:
        DatalistError: as :func:`load_datalist` and :func:`check_channel_count`.
    """
    entries = load_datalist(datalist_path, split=split, required_keys=(label_key, *other_keys))
    check_channel_count(entries, label_key, channel_names)
    return entries


def make_style_pairs(
    entries: Sequence[dict],
    contrasts: Sequence[str],
    subject_key: str = "subject",
    style_from_same_entry: bool = False,
) -> list[dict]:
    """Items for unpaired style training (brainSPADE): one per entry and contrast, holding ``label``, ``image`` (the
    entry's file of that contrast), ``contrast`` (its index in ``contrasts``), ``subject`` and ``style``: the
    candidate files a style is drawn from (pick one per epoch with :class:`~medgen_common.transforms.RandPickd`).

    2D (``style_from_same_entry=False``): the candidates are the same contrast's files of the *other* entries of
    the same subject (other slices), so the style encoder sees the contrast but never the content it must draw.
    3D (``True``): the candidate is the entry's own volume, from which a slice along another axis is taken
    (:class:`~medgen_common.transforms.RandSliced`).

    Raises:
        DatalistError: an entry misses a contrast or the subject key, or a subject has a single entry in 2D.
    """
    if len(contrasts) == 0:
        raise DatalistError("make_style_pairs needs at least one contrast.")
    by_subject: dict[str, list[dict]] = {}
    for index, entry in enumerate(entries):
        missing = [key for key in (subject_key, "label", *contrasts) if key not in entry]
        if missing:
            raise DatalistError(f"entry {index} misses key(s) {missing} needed for style pairs; it has {sorted(entry)}.")
        by_subject.setdefault(entry[subject_key], []).append(entry)
    items = []
    for entry in entries:
        siblings = by_subject[entry[subject_key]]
        if not style_from_same_entry and len(siblings) < 2:
            raise DatalistError(
                f"subject '{entry[subject_key]}' has a single slice: a style slice must be a different slice of the same "
                "subject (give at least two slices per subject)."
            )
        for index, contrast in enumerate(contrasts):
            style = [entry[contrast]] if style_from_same_entry else [s[contrast] for s in siblings if s is not entry]
            items.append(
                {"label": entry["label"], "image": entry[contrast], "style": style, "contrast": index,
                 "subject": entry[subject_key]}
            )  # fmt: skip
    return items


def expand_sequences(entries: Sequence[dict], sequences: Sequence[str], image_key: str = "image") -> list[dict]:
    """One item per entry and sequence, ``{image_key: entry[sequence], "sequence": index, ...other keys}``, e.g. to
    train one image autoencoder on every sequence of multi-sequence cases.

    Raises:
        DatalistError: an entry lacks one of ``sequences``.
    """
    items = []
    for index, entry in enumerate(entries):
        missing = [s for s in sequences if s not in entry]
        if missing:
            raise DatalistError(f"entry {index} misses sequence(s) {missing}; it has {sorted(entry)}.")
        others = {k: v for k, v in entry.items() if k not in sequences}
        items += [{**others, image_key: entry[s], "sequence": i} for i, s in enumerate(sequences)]
    return items
