"""Blinded reader studies (CSG's visual Turing test, MediSyn's and the prostate chapter's reader studies): real and
synthetic images shuffled under names that leak nothing, a blank response form, and the answer key kept apart.

Layout written by :func:`export_reader_study`::

    out_dir/blinded/images/image_000.png ...   give the blinded/ folder to the readers
    out_dir/blinded/responses.csv              columns image, response (blank; readers write real or synthetic)
    out_dir/answer_key.csv                     columns image, truth (real | synthetic), source_index, and any
                                               attributes of the images (e.g. sequence, lesion)

:func:`score_reader_study` scores a filled-in form against the key, synthetic being the positive class.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .context_selection import load_grey_image
from .writers import atomic_path, image_to_uint8, write_csv

__all__ = ["READER_LABELS", "export_reader_study", "score_reader_study"]

READER_LABELS = ("real", "synthetic")


def _tiles(value, value_range: Sequence[float]) -> np.ndarray:
    """A path (read with :func:`~medgen_common.context_selection.load_grey_image`, which maps ``value_range`` to
    [0, 1]) or an array ``[H, W]``, ``[H, W, 1]`` or ``[C, H, W]`` as uint8 ``[H, C * W]``: the channels side by side
    (e.g. a T2W-DW pair)."""
    if isinstance(value, (str, os.PathLike)):
        image, value_range = load_grey_image(value, value_range), (0.0, 1.0)
    else:
        image = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)).float()
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        image = image[None] if image.ndim == 2 else image
    if image.ndim != 3:
        raise ValueError(
            f"a reader-study image must be [H, W], [H, W, 1] or [C, H, W], got shape {tuple(image.shape)}."
        )
    return np.concatenate([image_to_uint8(channel, value_range)[..., 0] for channel in image], axis=1)


def export_reader_study(
    real_images: Sequence,
    synthetic_images: Sequence,
    out_dir: str | os.PathLike,
    seed: int = 0,
    value_range: Sequence[float] = (0.0, 1.0),
    real_attributes: Sequence[Mapping] | None = None,
    synthetic_attributes: Sequence[Mapping] | None = None,
    upscale: int = 1,
) -> dict[str, Any]:
    """Write a blinded reader study of ``real_images`` and ``synthetic_images`` (see the module docstring).

    Args:
        real_images, synthetic_images: paths or arrays ``[H, W]`` / ``[1, H, W]`` (a tensor ``[N, 1, H, W]`` also
            works); ``[C, H, W]`` is shown as C tiles side by side.
        out_dir: output folder.
        seed: seed of the shuffle.
        value_range: intensity range of every input, files and arrays alike (e.g. (0, 255) for 8-bit images); it is
            mapped to 0 and 255 (clipped), one window for both sets.
        real_attributes, synthetic_attributes: a dict per image, written to its row of the answer key only.
        upscale: nearest-neighbour magnification of small images.

    Returns:
        ``{"images": [png paths], "answer_key": path, "responses": path, "num_real", "num_synthetic"}``.
    """
    real_attributes = list(real_attributes) if real_attributes is not None else [{}] * len(real_images)
    synthetic_attributes = (
        list(synthetic_attributes) if synthetic_attributes is not None else [{}] * len(synthetic_images)
    )
    if len(real_attributes) != len(real_images) or len(synthetic_attributes) != len(synthetic_images):
        raise ValueError("give one attributes dict per image, or none.")
    sources = [("real", i, image, a) for i, (image, a) in enumerate(zip(real_images, real_attributes))]
    sources += [("synthetic", i, image, a) for i, (image, a) in enumerate(zip(synthetic_images, synthetic_attributes))]
    if not sources:
        raise ValueError("a reader study needs at least one image.")
    out_dir = Path(out_dir)
    image_dir = out_dir / "blinded" / "images"
    digits = max(3, len(str(len(sources) - 1)))
    order = np.random.default_rng(seed).permutation(len(sources))
    key_rows, paths = [], []
    for position, source in enumerate(order.tolist()):
        truth, index, image, attributes = sources[source]
        name = f"image_{position:0{digits}d}.png"
        pixels = _tiles(image, value_range).repeat(upscale, 0).repeat(upscale, 1)
        with atomic_path(image_dir / name) as temporary:
            Image.fromarray(pixels).save(temporary, format="PNG")  # uint8 [H, W]: 8-bit grey
        key_rows.append({"image": name, "truth": truth, "source_index": index, **attributes})
        paths.append(image_dir / name)
    columns = list(dict.fromkeys(column for row in key_rows for column in row))
    key_path, responses_path = out_dir / "answer_key.csv", out_dir / "blinded" / "responses.csv"
    write_csv(key_path, columns, key_rows)
    write_csv(responses_path, ["image", "response"], [{"image": row["image"], "response": ""} for row in key_rows])
    return {
        "images": [str(path) for path in paths],
        "answer_key": str(key_path),
        "responses": str(responses_path),
        "num_real": sum(row["truth"] == "real" for row in key_rows),
        "num_synthetic": sum(row["truth"] == "synthetic" for row in key_rows),
    }


def _read_csv(path: str | os.PathLike, columns: Sequence[str], what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at '{path}'.")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{what} '{path}' misses column(s) {missing}; it has {reader.fieldnames}.")
        return list(reader)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def score_reader_study(key_csv: str | os.PathLike, responses_csv: str | os.PathLike) -> dict[str, float | int]:
    """Score one reader's response form against the answer key of :func:`export_reader_study`.

    Synthetic is the positive class (as in CSG's Fig. 4: low is good for the generator). Responses are ``real`` or
    ``synthetic`` (any case); blank rows are counted as unanswered and left out.

    Returns:
        ``{"accuracy", "sensitivity" (synthetic called synthetic, TPR), "specificity" (real called real), "ppv",
        "f1", "true_positive", "false_positive", "true_negative", "false_negative", "answered", "unanswered"}``;
        a ratio with a zero denominator is NaN.

    Raises:
        ValueError: a response is neither real nor synthetic, or names an image the key does not hold.
    """
    truth = {row["image"]: row["truth"] for row in _read_csv(key_csv, ["image", "truth"], "reader-study answer key")}
    counts = {(t, r): 0 for t in READER_LABELS for r in READER_LABELS}
    unanswered = 0
    for line, row in enumerate(_read_csv(responses_csv, ["image", "response"], "reader-study responses"), start=2):
        response = (row["response"] or "").strip().lower()
        if row["image"] not in truth:
            raise ValueError(f"responses line {line}: image '{row['image']}' is not in the answer key.")
        if not response:
            unanswered += 1
            continue
        if response not in READER_LABELS:
            raise ValueError(f"responses line {line}: response '{row['response']}' must be 'real' or 'synthetic'.")
        counts[(truth[row["image"]], response)] += 1
    tp, fn = counts[("synthetic", "synthetic")], counts[("synthetic", "real")]
    tn, fp = counts[("real", "real")], counts[("real", "synthetic")]
    answered = tp + fn + tn + fp
    return {
        "accuracy": _ratio(tp + tn, answered),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "true_positive": tp,
        "false_positive": fp,
        "true_negative": tn,
        "false_negative": fn,
        "answered": answered,
        "unanswered": unanswered,
    }
