"""Geometry and texture editing for enlarging the variability of semantic masks and images (CSG §2.2.2, Fig. 5).

- :class:`MaskEdit` and :func:`edit_label_map`: the paper's recipe on integer label maps ``[H, W]`` (select a class
  or one of its connected components, take its bounding box, scale / rotate / translate it, blend it back in place
  of the original), with the vacated pixels filled so that no hole is left and the set of classes kept.
- :class:`RuleBasedEditParser`: a deterministic parser of instructions such as "enlarge the tendon by 30 %
  horizontally" into :class:`MaskEdit` s. The paper prompts an LLM for this step; any callable following
  :class:`EditParser` (e.g. a wrapper of a local LLM) can take its place in :class:`TextMaskEditor`.
- :func:`poisson_blend`: Poisson image editing (seamless cloning, Pérez et al. 2003) to transplant a texture.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import spsolve

__all__ = [
    "MaskEdit",
    "edit_label_map",
    "EditParser",
    "RuleBasedEditParser",
    "TextMaskEditor",
    "poisson_blend",
]


@dataclass(frozen=True)
class MaskEdit:
    """One geometric edit of one class of a label map: about the centre of the selected object's bounding box, scale
    along x and y, then rotate, then translate.

    Attributes:
        label: class value to edit.
        scale_x, scale_y: size factors (> 0) along columns (x) and rows (y).
        angle_degrees: rotation, counter-clockwise as displayed (row 0 at the top).
        shift_x, shift_y: translation in pixels, +x to the right, +y down.
        component: None edits every pixel of the class; an integer edits one 8-connected component, indexed by
            decreasing size (0 the largest, -1 the smallest; ties in raster order of their first pixel).
    """

    label: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    angle_degrees: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    component: int | None = None

    def __post_init__(self):
        if not (self.scale_x > 0 and self.scale_y > 0):
            raise ValueError(f"scale factors must be > 0, got scale_x={self.scale_x}, scale_y={self.scale_y}.")


def _select_object(label_map: np.ndarray, label: int, component: int | None) -> np.ndarray:
    """Boolean mask ``[H, W]`` of the class, or of one of its 8-connected components (by decreasing size)."""
    selected = label_map == label
    if component is None:
        return selected
    components, count = ndimage.label(selected, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")  # scipy numbers components in raster order: ties keep that order
    if not -count <= component < count:
        raise ValueError(f"class {label} has {count} connected component(s); component {component} does not exist.")
    return components == order[component] + 1


def _transform_object(selected: np.ndarray, edit: MaskEdit, clip_outside: bool) -> np.ndarray:
    """Nearest-neighbour image ``[H, W]`` of the boolean object under ``edit`` (scale, rotate, shift about the centre
    of its bounding box). Pixels leaving the image raise ValueError unless ``clip_outside``."""
    rows, cols = np.nonzero(selected)
    centre = np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2])
    angle = np.deg2rad(edit.angle_degrees)
    # (row, col) coordinates with rows pointing down: this matrix turns counter-clockwise on screen
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotation @ np.diag([edit.scale_y, edit.scale_x])
    shift = np.array([edit.shift_y, edit.shift_x])
    # a canvas holding both the image and the moved bounding box (pixel edges at +-0.5), to see what leaves the image
    edges_rows, edges_cols = (rows.min() - 0.5, rows.max() + 0.5), (cols.min() - 0.5, cols.max() + 0.5)
    corners = np.array([[r, c] for r in edges_rows for c in edges_cols])
    moved = (corners - centre) @ forward.T + centre + shift
    size = np.array(selected.shape)
    low = np.minimum(np.floor(moved.min(0)).astype(int), 0)
    high = np.maximum(np.ceil(moved.max(0)).astype(int), size - 1)
    inverse = np.linalg.inv(forward)
    # canvas pixel q is image pixel q + low, whose source pixel is inverse (q + low - centre - shift) + centre
    canvas = ndimage.affine_transform(
        selected.astype(np.uint8), inverse, offset=inverse @ (low - centre - shift) + centre,
        output_shape=tuple(high - low + 1), order=0, mode="constant", cval=0,
    ).astype(bool)  # fmt: skip
    inside = canvas[-low[0] : -low[0] + size[0], -low[1] : -low[1] + size[1]]
    outside = int(canvas.sum() - inside.sum())
    if outside and not clip_outside:
        raise ValueError(
            f"{edit} moves {outside} pixel(s) of class {edit.label} out of the {size[0]}x{size[1]} image; "
            "use clip_outside=True to drop them."
        )
    return inside


def edit_label_map(
    label_map: np.ndarray,
    edits: Sequence[MaskEdit],
    confine_to: Mapping[int, Collection[int]] | None = None,
    clip_outside: bool = False,
) -> np.ndarray:
    """Apply ``edits`` in turn to an integer label map ``[H, W]``; returns a new map of the same shape and dtype.

    Each edit: (a) selects the class (or one component), (b-c) transforms it with nearest-neighbour resampling about
    its bounding-box centre, (d) erases the original object, giving every vacated pixel the label of the nearest pixel
    outside the object (Euclidean distance transform: an enclosed object is filled with its host, an object between
    two tissues is split between them), then paints the moved object on top.

    Args:
        label_map: integer classes ``[H, W]``.
        edits: applied in order.
        confine_to: per edited class, the classes its moved object may paint over (e.g. ``{DITF: [tendon]}`` keeps a
            tear inside the tendon); pixels of other classes keep their label. Unlisted classes paint anywhere.
        clip_outside: drop the parts moved out of the image instead of raising ValueError.

    Raises:
        ValueError: when an edit would change the set of classes (a class painted over entirely, or the edited object
            shrunk, clipped or confined away), or names a class that is absent. No edit can create a class.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(
            f"expected an integer label map [H, W], got dtype {label_map.dtype} and shape {label_map.shape}."
        )
    edited = label_map.copy()
    for edit in edits:
        classes = set(np.unique(edited).tolist())
        if edit.label not in classes:
            raise ValueError(f"class {edit.label} is not in the label map (classes {sorted(classes)}).")
        selected = _select_object(edited, edit.label, edit.component)
        if selected.all():
            raise ValueError(f"class {edit.label} fills the whole image: nothing is left to fill the vacated pixels.")
        moved = _transform_object(selected, edit, clip_outside)
        _, (nearest_rows, nearest_cols) = ndimage.distance_transform_edt(selected, return_indices=True)
        result = edited.copy()
        result[selected] = edited[nearest_rows[selected], nearest_cols[selected]]
        if confine_to is not None and edit.label in confine_to:
            moved &= np.isin(result, [*confine_to[edit.label], edit.label])
        result[moved] = edit.label
        lost = classes - set(np.unique(result).tolist())
        if lost:
            raise ValueError(
                f"{edit} would remove class(es) {sorted(lost)} from the label map; the class set must be kept."
            )
        edited = result
    return edited


class EditParser(Protocol):
    """Maps one text instruction to the :class:`MaskEdit` s it asks for.

    :class:`RuleBasedEditParser` is the offline default. An LLM plug-in (the paper prompts a pre-trained LLM) is any
    callable with this signature; it must load its weights from a local path and never download them.
    """

    def __call__(self, text: str) -> Sequence[MaskEdit]: ...


_NUMBER = r"(\d+(?:\.\d+)?)"
_OPERATIONS = {
    "enlarge": r"enlarge|grow|expand|increase|magnify|widen|bigger|larger|wider|taller",
    "shrink": r"shrink|reduce|decrease|narrow|smaller|narrower",
    "scale": r"scale|resize",
    "move": r"move|shift|translate|displace|push",
    "rotate": r"rotate|turn|tilt",
}
_HORIZONTAL = (
    r"\b(horizontally|horizontal|laterally|width|widen|wider|narrow|narrower)\b|\b(in|along) (the )?x\b|\bx[- ]?axis\b"
)
_VERTICAL = r"\b(vertically|vertical|height|taller)\b|\b(in|along) (the )?y\b|\by[- ]?axis\b"
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "upwards": (0, -1), "down": (0, 1), "downwards": (0, 1)}


class RuleBasedEditParser:
    """Deterministic parser of mask-edit instructions (the offline stand-in for the paper's LLM prompt).

    Commands are separated by ``;``, new lines, sentence ends, "then", or "and" before an operation word. Each names
    one class (its first mention, longest name first, case-insensitive) and one operation:

    - enlarge / grow / expand / widen ... and shrink / reduce / narrow ...: "by N %" gives ``1 +- N/100``, "to N %"
      gives ``N/100``, "by a factor of F" / "F times" / "Fx" gives ``F`` (``1/F`` when shrinking by F > 1);
    - scale / resize: "by F" / "to F" / "F times" or "to N %" (the final size);
    - axes: "horizontally" / "in x" / "width" -> x only, "vertically" / "in y" / "height" -> y only, neither or
      both -> x and y;
    - move / shift / translate: "N px left|right|up|down" or "left|right|up|down by N px", summed over pairs;
    - rotate / turn / tilt: "N degrees" (or "°"), counter-clockwise unless "clockwise" is said;
    - "largest" / "smallest" before the class selects that connected component.

    Args:
        class_names: class name -> label value, e.g. ``{"tendon": 2, "DITF": 4}``.
        synonyms: other name -> class name, e.g. ``{"tendon tear": "DITF"}``.

    Raises ValueError naming the phrase it could not parse and what is missing.
    """

    def __init__(self, class_names: Mapping[str, int], synonyms: Mapping[str, str] | None = None):
        self.labels = {name.lower(): int(label) for name, label in class_names.items()}
        for alias, name in (synonyms or {}).items():
            if name.lower() not in self.labels:
                raise ValueError(f"synonym '{alias}' refers to unknown class '{name}'; classes: {sorted(self.labels)}.")
            self.labels[alias.lower()] = self.labels[name.lower()]
        names = sorted(self.labels, key=len, reverse=True)  # longest first: "bone irregularity" before "bone"
        self._class_pattern = re.compile(r"\b(" + "|".join(re.escape(name) for name in names) + r")\b")
        verbs = "|".join(_OPERATIONS.values())
        self._split_pattern = re.compile(rf";|\n|\.\s+|\.$|\bthen\b|\band\b(?=\s+(?:{verbs})\b)")

    def __call__(self, text: str) -> list[MaskEdit]:
        phrases = [p.strip(" ,") for p in self._split_pattern.split(text) if p and p.strip(" ,")]
        if not phrases:
            raise ValueError(f"no edit command in {text!r}.")
        return [self._parse_phrase(phrase) for phrase in phrases]

    def _parse_phrase(self, phrase: str) -> MaskEdit:
        text = " ".join(phrase.lower().replace("%", " percent").replace("°", " degrees").split())

        def fail(reason: str) -> ValueError:
            return ValueError(f"cannot parse the edit command {phrase!r}: {reason}.")

        operations = [name for name, words in _OPERATIONS.items() if re.search(rf"\b({words})\b", text)]
        if "scale" in operations or "rotate" in operations or "move" in operations:
            operations = [op for op in operations if op not in ("enlarge", "shrink")]  # "scale ... larger" is a scale
        if len(operations) != 1:
            expected = ", ".join(_OPERATIONS)
            raise fail(f"expected exactly one operation ({expected}), found {operations or 'none'}")
        match = self._class_pattern.search(text)
        if match is None:
            raise fail(f"no known class (known: {', '.join(sorted(self.labels))})")
        label = self.labels[match.group(1)]
        prefix = text[: match.start()]
        component = 0 if re.search(r"\blargest\s+$", prefix) else -1 if re.search(r"\bsmallest\s+$", prefix) else None
        operation = operations[0]
        if operation == "move":
            return MaskEdit(label=label, component=component, **self._parse_shift(text, fail))
        if operation == "rotate":
            degrees = re.search(rf"{_NUMBER}\s*(?:degrees|degree|deg)\b", text)
            if degrees is None:
                raise fail("no angle (e.g. '15 degrees')")
            clockwise = re.search(r"\bclockwise\b", text) and not re.search(r"\b(counter|anti)-?\s?clockwise\b", text)
            angle = float(degrees.group(1))
            return MaskEdit(label=label, angle_degrees=-angle if clockwise else angle, component=component)
        factor = self._parse_factor(text, operation, fail)
        horizontal, vertical = re.search(_HORIZONTAL, text), re.search(_VERTICAL, text)
        both = (horizontal is None) == (vertical is None)
        return MaskEdit(
            label=label,
            scale_x=factor if both or horizontal else 1.0,
            scale_y=factor if both or vertical else 1.0,
            component=component,
        )

    @staticmethod
    def _parse_factor(text: str, operation: str, fail) -> float:
        """Size factor of an enlarge / shrink / scale phrase."""
        percent = re.search(rf"\b(by|to)?\s*{_NUMBER}\s*percent\b", text)
        ratio = re.search(rf"\bfactor of {_NUMBER}|{_NUMBER}\s*(?:times|x)\b", text)
        if ratio is None and operation == "scale":  # a bare number is a factor only after "scale" / "resize"
            ratio = re.search(rf"\b(?:by|to) {_NUMBER}\b(?!\s*(?:px|pixels?|percent)\b)", text)
        if percent is not None:
            value = float(percent.group(2)) / 100
            if percent.group(1) == "to" or operation == "scale":
                factor = value
            else:
                factor = 1 + value if operation == "enlarge" else 1 - value
        elif ratio is not None:
            value = float(next(group for group in ratio.groups() if group is not None))
            factor = 1 / value if operation == "shrink" and value > 1 else value
        else:
            raise fail("no amount (e.g. 'by 30 %' or 'by a factor of 1.5')")
        if factor <= 0:
            raise fail(f"the size factor would be {factor:g}; it must be > 0")
        return factor

    @staticmethod
    def _parse_shift(text: str, fail) -> dict:
        """``shift_x``, ``shift_y`` in pixels of a move phrase."""
        directions = "|".join(sorted(_DIRECTIONS, key=len, reverse=True))
        unit = r"(?:\s*(?:px|pixels|pixel))?"
        amount_first = re.compile(rf"{_NUMBER}{unit}\s+(?:to\s+the\s+)?({directions})\b")
        pairs = [(m.group(1), m.group(2)) for m in amount_first.finditer(text)]
        # then "left by 20 px" in what is left, so "20 px left 5 px down" is not also read as "left 5 px"
        rest = amount_first.sub(" ", text)
        pairs += [(m.group(2), m.group(1)) for m in re.finditer(rf"\b({directions})\s+(?:by\s+)?{_NUMBER}{unit}", rest)]
        if not pairs:
            raise fail("no displacement (e.g. '20 px left')")
        shift = np.sum([np.multiply(_DIRECTIONS[direction], float(amount)) for amount, direction in pairs], axis=0)
        return {"shift_x": float(shift[0]), "shift_y": float(shift[1])}


class TextMaskEditor:
    """Edit label maps ``[H, W]`` from text instructions: ``parser(text)`` then :func:`edit_label_map`.

    Args:
        class_names: class name -> label value.
        synonyms: other name -> class name (used by the default parser).
        confine_to: class name -> names of the classes it may paint over (see :func:`edit_label_map`).
        clip_outside: drop parts moved out of the image instead of raising.
        parser: any :class:`EditParser` (e.g. a local LLM wrapper); the :class:`RuleBasedEditParser` by default.
    """

    def __init__(
        self,
        class_names: Mapping[str, int],
        synonyms: Mapping[str, str] | None = None,
        confine_to: Mapping[str, Sequence[str]] | None = None,
        clip_outside: bool = False,
        parser: EditParser | None = None,
    ):
        labels = {name.lower(): int(label) for name, label in class_names.items()}

        def label_of(name: str) -> int:
            if name.lower() not in labels:
                raise ValueError(f"unknown class '{name}' in confine_to; classes: {sorted(labels)}.")
            return labels[name.lower()]

        self.confine_to = {label_of(k): [label_of(v) for v in vs] for k, vs in (confine_to or {}).items()}
        self.clip_outside = clip_outside
        self.parser = parser if parser is not None else RuleBasedEditParser(class_names, synonyms)

    def __call__(self, label_map: np.ndarray, text: str) -> np.ndarray:
        edits = list(self.parser(text))
        for edit in edits:
            if not isinstance(edit, MaskEdit):
                raise TypeError(
                    f"the edit parser must return MaskEdit objects, got {type(edit).__name__} for {text!r}."
                )
        return edit_label_map(label_map, edits, confine_to=self.confine_to, clip_outside=self.clip_outside)


def poisson_blend(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seamless cloning (Pérez et al. 2003, Eq. 7 with guidance field ``v = grad(source)``).

    Solves, for every pixel ``p`` of the region ``Ω = mask`` with ``N_p`` its 4-neighbours inside the image::

        |N_p| f_p - sum_{q in N_p ∩ Ω} f_q = sum_{q in N_p \\ Ω} target_q + sum_{q in N_p} (source_p - source_q)

    with one sparse direct solve (scipy), so the result has the source's gradients inside ``Ω`` and meets the target
    on its boundary. Outside ``Ω`` it is the target. For texture transplant, ``mask`` is typically
    ``label_map == label``.

    Args:
        source: image ``[H, W]`` giving the texture (gradients) inside the region.
        target: image ``[H, W]`` receiving it.
        mask: boolean region ``[H, W]``; must leave at least one pixel of the target.

    Returns:
        float64 image ``[H, W]``.
    """
    source, target, mask = np.asarray(source, np.float64), np.asarray(target, np.float64), np.asarray(mask, bool)
    if source.ndim != 2 or source.shape != target.shape or mask.shape != target.shape:
        raise ValueError(
            f"source, target and mask must be [H, W] of one shape, got {source.shape}, {target.shape}, {mask.shape}."
        )
    if mask.all():
        raise ValueError("the mask covers the whole image: without a boundary the solution is not unique.")
    result = target.copy()
    if not mask.any():
        return result
    rows, cols = np.nonzero(mask)
    index = np.full(mask.shape, -1)
    index[rows, cols] = np.arange(rows.size)
    diagonal = np.zeros(rows.size)
    rhs = np.zeros(rows.size)
    off_rows, off_cols = [], []
    for d_row, d_col in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        n_rows, n_cols = rows + d_row, cols + d_col
        valid = (n_rows >= 0) & (n_rows < mask.shape[0]) & (n_cols >= 0) & (n_cols < mask.shape[1])
        p, q_rows, q_cols = np.nonzero(valid)[0], n_rows[valid], n_cols[valid]
        diagonal[p] += 1
        rhs[p] += source[rows[p], cols[p]] - source[q_rows, q_cols]
        in_region = mask[q_rows, q_cols]
        rhs[p[~in_region]] += target[q_rows[~in_region], q_cols[~in_region]]
        off_rows.append(p[in_region])
        off_cols.append(index[q_rows[in_region], q_cols[in_region]])
    off_rows, off_cols = np.concatenate(off_rows), np.concatenate(off_cols)
    matrix = sparse.coo_matrix(
        (np.concatenate([diagonal, -np.ones(off_rows.size)]),
         (np.concatenate([np.arange(rows.size), off_rows]), np.concatenate([np.arange(rows.size), off_cols]))),
        shape=(rows.size, rows.size),
    ).tocsc()  # fmt: skip
    result[rows, cols] = spsolve(matrix, rhs)
    return result
