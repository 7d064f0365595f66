"""Mask geometry edits, their text interface, and Poisson texture transplant (CSG §2.2.2)."""

from __future__ import annotations

import numpy as np
import pytest

from medgen_common.mask_editing import (
    MaskEdit,
    RuleBasedEditParser,
    TextMaskEditor,
    edit_label_map,
    poisson_blend,
)

BACKGROUND, BONE, TENDON, MUSCLE, DITF, CALCIFICATION = 0, 1, 2, 3, 4, 5
CLASS_NAMES = {"background": 0, "bone": 1, "tendon": 2, "muscle": 3, "DITF": 4, "calcification": 5,
               "bone irregularity": 6, "anisotropy": 7}  # fmt: skip
SYNONYMS = {"tendon tear": "DITF", "tear": "DITF", "calcific deposit": "calcification"}


def _shoulder_mask() -> np.ndarray:
    """64x64 long-axis layers: background, muscle, tendon (with a DITF ellipse and a calcification), bone, shadow."""
    mask = np.zeros((64, 64), dtype=np.int16)
    mask[10:25] = MUSCLE
    mask[25:40] = TENDON
    mask[40:43] = BONE
    rows, cols = np.mgrid[:64, :64]
    mask[((rows - 32) / 4) ** 2 + ((cols - 30) / 8) ** 2 <= 1] = DITF
    mask[(rows - 30) ** 2 + (cols - 50) ** 2 <= 4] = CALCIFICATION
    return mask


def _bbox(selected: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.nonzero(selected)
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


def _extent(selected: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box."""
    rows, cols = _bbox(selected)
    return rows.stop - rows.start, cols.stop - cols.start


@pytest.mark.parametrize(
    "edit",
    [
        MaskEdit(DITF, scale_x=0.5, scale_y=0.5),
        MaskEdit(DITF, scale_x=1.3, scale_y=1.2),
        MaskEdit(DITF, shift_x=-6, shift_y=2),
        MaskEdit(DITF, angle_degrees=30),
    ],
)
def test_edits_keep_size_and_classes_and_leave_no_holes(edit):
    mask = _shoulder_mask()
    edited = edit_label_map(mask, [edit])
    assert edited.shape == mask.shape and edited.dtype == mask.dtype
    assert set(np.unique(edited)) == set(np.unique(mask))
    box = _bbox(mask == DITF)
    # the DITF's former box holds only tendon, DITF and what was there: no background (hole) appears in it
    assert not np.any((edited[box] == BACKGROUND) & (mask[box] != BACKGROUND))
    assert set(np.unique(edited[box])) <= {TENDON, DITF, CALCIFICATION}
    vacated = (mask == DITF) & (edited != DITF)
    assert np.all(edited[vacated] == TENDON)  # the enclosing class fills what the object left
    untouched = (mask != DITF) & (edited != DITF)
    assert np.array_equal(edited[untouched], mask[untouched])


def test_horizontal_scale_by_1_3_widens_the_object_by_30_percent():
    mask = _shoulder_mask()
    edited = edit_label_map(mask, [MaskEdit(DITF, scale_x=1.3)])
    (height, width), (new_height, new_width) = _extent(mask == DITF), _extent(edited == DITF)
    assert width == 17 and abs(new_width - 1.3 * width) <= 1  # 22.1 px, up to one pixel of rounding
    assert new_height == height
    assert (edited == DITF).sum() / (mask == DITF).sum() == pytest.approx(1.3, abs=0.06)


def test_translation_moves_the_centroid_by_the_requested_pixels():
    mask = _shoulder_mask()
    edited = edit_label_map(mask, [MaskEdit(DITF, shift_x=-6, shift_y=3)])
    before, after = np.argwhere(mask == DITF).mean(0), np.argwhere(edited == DITF).mean(0)
    np.testing.assert_allclose(after - before, [3, -6])  # (rows, cols): 3 px down, 6 px left
    assert (edited == DITF).sum() == (mask == DITF).sum()


def test_rotation_turns_counter_clockwise_unless_negative():
    mask = np.zeros((64, 64), dtype=np.int32)
    mask[30:33, 20:41] = 1  # horizontal bar
    mask[24:30, 38:41] = 1  # with a leg rising from its right end
    height, width = _extent(mask == 1)
    for angle in (90, -90):
        edited = edit_label_map(mask, [MaskEdit(1, angle_degrees=angle)])
        assert _extent(edited == 1) == (width, height)
        rows = np.nonzero(edited == 1)[0]
        top, bottom = (edited[rows.min()] == 1).sum(), (edited[rows.max()] == 1).sum()
        # counter-clockwise on screen: the right end goes up and the leg then points left, so the top row is wide
        assert (top > bottom) if angle == 90 else (top < bottom)


def test_moving_out_of_the_image_raises_unless_clipped():
    mask = _shoulder_mask()
    with pytest.raises(ValueError, match="out of the 64x64 image"):
        edit_label_map(mask, [MaskEdit(DITF, shift_x=-25)])
    clipped = edit_label_map(mask, [MaskEdit(DITF, shift_x=-25)], clip_outside=True)
    assert 0 < (clipped == DITF).sum() < (mask == DITF).sum() and np.any(clipped[:, 0] == DITF)
    with pytest.raises(ValueError, match=r"remove class\(es\) \[4\]"):  # entirely out: the class would vanish
        edit_label_map(mask, [MaskEdit(DITF, shift_x=-60)], clip_outside=True)


def test_an_edit_that_would_paint_over_a_class_raises_unless_confined():
    mask = _shoulder_mask()
    with pytest.raises(ValueError, match=r"remove class\(es\) \[5\]"):  # the enlarged tear swallows the calcification
        edit_label_map(mask, [MaskEdit(DITF, scale_x=3.5, scale_y=2.0)])
    edited = edit_label_map(mask, [MaskEdit(DITF, scale_x=3.5, scale_y=2.0)], confine_to={DITF: [TENDON]})
    assert np.array_equal(edited == CALCIFICATION, mask == CALCIFICATION)
    assert np.all(np.isin(mask[edited == DITF], [TENDON, DITF]))  # the tear stays inside the tendon
    assert (edited == DITF).sum() > 2 * (mask == DITF).sum()


def test_confined_move_keeps_the_finding_in_its_host():
    mask = _shoulder_mask()
    edited = edit_label_map(mask, [MaskEdit(DITF, shift_y=5)], confine_to={DITF: [TENDON]})
    assert np.all(np.isin(mask[edited == DITF], [TENDON, DITF]))
    assert np.array_equal(edited == BONE, mask == BONE)
    assert (edited == DITF).sum() < (mask == DITF).sum()  # the rows pushed into the bone were dropped


def test_component_edit_moves_only_the_selected_component():
    mask = _shoulder_mask()
    mask[35:37, 10:12] = CALCIFICATION  # a second, smaller calcification (4 px against 13)
    small = mask == CALCIFICATION
    small[:, 40:] = False
    edited = edit_label_map(mask, [MaskEdit(CALCIFICATION, shift_x=3, component=0)])
    assert np.array_equal(edited[small], mask[small])
    np.testing.assert_allclose(
        np.argwhere((edited == CALCIFICATION) & ~small).mean(0) - np.argwhere((mask == CALCIFICATION) & ~small).mean(0),
        [0, 3],
    )
    with pytest.raises(ValueError, match="component 2 does not exist"):
        edit_label_map(mask, [MaskEdit(CALCIFICATION, component=2)])


def test_edit_errors_name_the_problem():
    mask = _shoulder_mask()
    with pytest.raises(ValueError, match="class 7 is not in the label map"):
        edit_label_map(mask, [MaskEdit(7, scale_x=2)])
    with pytest.raises(ValueError, match="integer label map"):
        edit_label_map(mask.astype(float), [MaskEdit(DITF)])
    with pytest.raises(ValueError, match="must be > 0"):
        MaskEdit(DITF, scale_x=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("enlarge the tendon by 30 % horizontally", [MaskEdit(TENDON, scale_x=1.3)]),
        ("move the DITF 20 px left", [MaskEdit(DITF, shift_x=-20)]),
        ("rotate the calcification by 15 degrees", [MaskEdit(CALCIFICATION, angle_degrees=15)]),
        ("shrink the bone by 10% vertically", [MaskEdit(BONE, scale_y=0.9)]),
        ("Shrink the bone irregularity to 80%.", [MaskEdit(6, scale_x=0.8, scale_y=0.8)]),
        ("move the tendon tear 4 pixels to the right and 2 px down", [MaskEdit(DITF, shift_x=4, shift_y=2)]),
        ("move the muscle up by 3 px", [MaskEdit(MUSCLE, shift_y=-3)]),
        ("enlarge the largest calcific deposit 1.5x in y", [MaskEdit(CALCIFICATION, scale_y=1.5, component=0)]),
        (
            "rotate the DITF 10° clockwise; then shrink the muscle by a factor of 2 and move the bone 5 px up",
            [MaskEdit(DITF, angle_degrees=-10), MaskEdit(MUSCLE, scale_x=0.5, scale_y=0.5), MaskEdit(BONE, shift_y=-5)],
        ),
    ],
)
def test_parser_maps_instructions_to_edits(text, expected):
    assert RuleBasedEditParser(CLASS_NAMES, SYNONYMS)(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("make it pretty", "'make it pretty'.*expected exactly one operation"),
        ("enlarge the spleen by 10%", "'enlarge the spleen by 10%'.*no known class"),
        ("enlarge the tendon", "'enlarge the tendon'.*no amount"),
        ("enlarge the tendon by 30", "no amount"),  # 30 what? a bare number is not a percentage
        ("move the DITF 20 mm left", "'move the DITF 20 mm left'.*no displacement"),
        ("rotate the DITF a bit", "no angle"),
        ("enlarge and rotate the tendon by 10 degrees", "'enlarge'.*no known class"),
    ],
)
def test_parser_rejects_what_it_cannot_read_naming_the_phrase(text, message):
    with pytest.raises(ValueError, match=message):
        RuleBasedEditParser(CLASS_NAMES, SYNONYMS)(text)


def test_text_editor_applies_parsed_edits_and_accepts_a_plug_in_parser():
    mask = _shoulder_mask()
    editor = TextMaskEditor(CLASS_NAMES, SYNONYMS, confine_to={"DITF": ["tendon"]})
    edited = editor(mask, "enlarge the tear by 30% horizontally")
    assert np.array_equal(edited, edit_label_map(mask, [MaskEdit(DITF, scale_x=1.3)], confine_to={DITF: [TENDON]}))

    def stub_llm(text: str) -> list[MaskEdit]:  # an EditParser, as a local-LLM wrapper would be
        return [MaskEdit(DITF, shift_x=-6)]

    plugged = TextMaskEditor(CLASS_NAMES, parser=stub_llm)(mask, "slide the lesion a little to the left")
    assert np.array_equal(plugged, edit_label_map(mask, [MaskEdit(DITF, shift_x=-6)]))
    with pytest.raises(TypeError, match="must return MaskEdit"):
        TextMaskEditor(CLASS_NAMES, parser=lambda text: [{"label": DITF}])(mask, "anything")


def _texture(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(size, size))


def _region(size: int = 32) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return ((rows - 15) / 9) ** 2 + ((cols - 13) / 11) ** 2 <= 1


def test_poisson_blend_reproduces_a_source_that_differs_by_a_constant():
    source, region = _texture(0), _region()
    blended = poisson_blend(source, source + 5.0, region)
    np.testing.assert_allclose(blended, source + 5.0, atol=1e-9)
    blended = poisson_blend(source, source - 2.0, region)
    np.testing.assert_allclose(blended[region], source[region] - 2.0, atol=1e-9)


def test_poisson_blend_keeps_the_outside_and_matches_source_gradients_inside():
    source, target, region = _texture(0), _texture(1), _region()
    blended = poisson_blend(source, target, region)
    assert np.array_equal(blended[~region], target[~region])  # including the boundary ring that pins the solution

    def laplacian(image):
        return 4 * image[1:-1, 1:-1] - image[:-2, 1:-1] - image[2:, 1:-1] - image[1:-1, :-2] - image[1:-1, 2:]

    np.testing.assert_allclose(laplacian(blended)[region[1:-1, 1:-1]], laplacian(source)[region[1:-1, 1:-1]], atol=1e-9)
    assert np.abs(blended[region] - source[region]).mean() > 0.1  # it is not a copy: the offset follows the target


def test_poisson_blend_interpolates_the_boundary_harmonically():
    rows, cols = np.mgrid[:32, :32]
    ramp = 0.5 * rows - 0.25 * cols + 3.0  # discrete-harmonic: the solution with a flat source
    blended = poisson_blend(np.zeros((32, 32)), ramp, _region())
    np.testing.assert_allclose(blended, ramp, atol=1e-9)


def test_poisson_blend_handles_regions_at_the_image_border_and_rejects_bad_input():
    source, target = _texture(0), _texture(1)
    region = np.zeros((32, 32), bool)
    region[:10, :12] = True  # touches two image borders: those pixels have fewer neighbours
    np.testing.assert_allclose(poisson_blend(source, source + 1.0, region), source + 1.0, atol=1e-9)
    assert np.array_equal(poisson_blend(source, target, np.zeros((32, 32), bool)), target)
    with pytest.raises(ValueError, match="whole image"):
        poisson_blend(source, target, np.ones((32, 32), bool))
    with pytest.raises(ValueError, match="one shape"):
        poisson_blend(source, target[:31], region)
