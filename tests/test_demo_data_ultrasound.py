"""Tests of the MSK ultrasound demo data and its speckle simulator (``medgen_common.demo_data.ultrasound``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage
from scipy import ndimage

from medgen_common.demo_data import GENERATORS
from medgen_common.demo_data.ultrasound import (
    CLASS_NAMES,
    DEVICES,
    FIELD_OF_VIEW_MM,
    GRIDS,
    PREVALENCE,
    ProbePose,
    UltrasoundDevice,
    apply_psf,
    log_compress,
    make_msk_dataset,
    render_msk_frame,
    sample_msk_subject,
    scatterer_field,
    simulate_bmode,
    transmission,
)
from tools.make_demo_data import main as make_demo_data_main

BACKGROUND, BONE, TENDON, MUSCLE, DITF, CALCIFICATION, BONE_IRREGULARITY, ANISOTROPY = range(8)
N_SUBJECTS = 16
FRAMES = 2
GRID = GRIDS["demo"]
SPLITS = ("training", "validation", "test")
# a device that leaves the speckle and its statistics alone: no gain, TGC, noise, blur or quantisation to speak of
PLAIN = UltrasoundDevice("plain", 0.1, 0.1, 400.0, 0.0, 80.0, 0.0, -200.0, 0.0, 65536)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 16-subject, 2-frame demo-grid dataset with its datalist, images and labels loaded."""
    out_dir = tmp_path_factory.mktemp("msk")
    datalists = make_msk_dataset(out_dir, n_subjects=N_SUBJECTS, seed=0, frames_per_subject=FRAMES)
    content = json.loads(datalists["demo/2d"].read_text())
    entries = [entry for split in SPLITS for entry in content[split]]
    grid_dir = out_dir / "demo"
    images = np.stack([np.asarray(nib.load(grid_dir / entry["image"]).dataobj)[..., 0] for entry in entries])
    labels = np.stack([np.asarray(nib.load(grid_dir / entry["label"]).dataobj)[..., 0] for entry in entries])
    return {"out_dir": out_dir, "datalists": datalists, "content": content, "entries": entries, "images": images,
            "labels": labels}  # fmt: skip


def _correlation(image: np.ndarray, mask: np.ndarray, lag: int, axis: int) -> float:
    """Correlation of ``image`` with itself shifted by ``lag`` pixels along ``axis``, over pairs inside ``mask``."""
    first = [slice(None)] * 2
    second = [slice(None)] * 2
    first[axis], second[axis] = slice(None, -lag), slice(lag, None)
    pairs = mask[tuple(first)] & mask[tuple(second)]
    return float(np.corrcoef(image[tuple(first)][pairs], image[tuple(second)][pairs])[0, 1])


def _below(mask: np.ndarray) -> np.ndarray:
    """Pixels strictly deeper than the first pixel of ``mask`` in their column."""
    return (np.cumsum(mask, axis=0) > 0) & ~mask


# ------------------------------------------------------------------------------------------- files and datalist


def test_registry_and_datalist_metadata(dataset):
    assert GENERATORS["msk_ultrasound"] is make_msk_dataset
    assert set(dataset["datalists"]) == {"demo/2d"}
    content = dataset["content"]
    assert content["class_names"] == list(CLASS_NAMES) == [
        "background", "bone", "tendon", "muscle", "ditf", "calcification", "bone_irregularity", "anisotropy"
    ]  # fmt: skip
    assert content["device_names"] == [device.name for device in DEVICES] and len(set(content["device_names"])) == 4
    assert content["shape"] == [64, 64, 1]
    assert content["spacing_mm"] == [GRID.pixel_mm] * 3
    assert GRID.shape[0] * GRID.pixel_mm == FIELD_OF_VIEW_MM
    assert "simulated" in content["description"]


def test_every_entry_loads_with_monai_with_valid_types_and_ranges(dataset):
    loader = LoadImage(image_only=True)
    path = dataset["datalists"]["demo/2d"]
    for entry in dataset["entries"]:
        image = loader(str(path.parent / entry["image"]))
        label = nib.load(path.parent / entry["label"])
        assert tuple(image.shape) == (64, 64, 1) and label.shape == (64, 64, 1)
        assert label.get_data_dtype() == np.uint8
        assert nib.load(path.parent / entry["image"]).get_data_dtype() == np.float32
        np.testing.assert_allclose(label.affine, np.diag([GRID.pixel_mm] * 3 + [1.0]))
        subject = int(entry["subject"].removeprefix("sub-"))
        assert entry["device"] == subject % len(DEVICES)
        assert entry["frame"] in range(FRAMES)
    images, labels = dataset["images"], dataset["labels"]
    assert images.dtype == np.float32 and images.min() >= 0.0 and images.max() <= 1.0
    assert np.all(images.std(axis=(1, 2)) > 0.1)
    assert labels.dtype == np.uint8 and labels.max() < len(CLASS_NAMES)


def test_splits_are_disjoint_by_subject_and_each_subject_has_all_frames(dataset):
    content = dataset["content"]
    subjects = {split: {entry["subject"] for entry in content[split]} for split in SPLITS}
    assert all(subjects.values())
    assert not (subjects["training"] & subjects["validation"] or subjects["training"] & subjects["test"]
                or subjects["validation"] & subjects["test"])  # fmt: skip
    assert set().union(*subjects.values()) == {f"sub-{index:03d}" for index in range(N_SUBJECTS)}
    for split in SPLITS:
        for subject in subjects[split]:
            entries = [entry for entry in content[split] if entry["subject"] == subject]
            assert sorted(entry["frame"] for entry in entries) == list(range(FRAMES))
            assert len({entry["device"] for entry in entries}) == 1


def test_generation_is_deterministic_and_a_smaller_dataset_is_a_prefix(dataset, tmp_path):
    again = make_msk_dataset(tmp_path / "again", n_subjects=3, seed=0, frames_per_subject=FRAMES)["demo/2d"].parent
    other = make_msk_dataset(tmp_path / "other", n_subjects=1, seed=1, frames_per_subject=1)["demo/2d"].parent
    original = dataset["out_dir"] / "demo"
    for name in ("2d/sub-000_f00_image.nii.gz", "2d/sub-002_f01_label.nii.gz", "2d/sub-001_f01_image.nii.gz"):
        assert (again / name).read_bytes() == (original / name).read_bytes()
    name = "2d/sub-000_f00_image.nii.gz"
    assert (other / name).read_bytes() != (original / name).read_bytes()


def test_make_demo_data_cli_writes_the_ultrasound_dataset(tmp_path, capsys):
    make_demo_data_main(["--modality", "msk_ultrasound", "--out", str(tmp_path), "--n", "4"])
    assert "msk_ultrasound: wrote" in capsys.readouterr().out
    content = json.loads((tmp_path / "demo" / "datalist_2d.json").read_text())
    entries = [entry for split in SPLITS for entry in content[split]]
    assert len(entries) == 4 * 8  # default frames_per_subject
    assert all((tmp_path / "demo" / entry[key]).is_file() for entry in entries for key in ("image", "label"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_subjects": 0}, "n_subjects"),
        ({"seed": -1}, "seed"),
        ({"frames_per_subject": 0}, "frames_per_subject"),
        ({"devices": 0}, "devices"),
        ({"devices": len(DEVICES) + 1}, "devices"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"grids": ["demo", "huge"]}, "unknown grid 'huge' in grids"),
        ({"finding_prevalence": {"tumour": 0.5}}, "unknown name 'tumour' in finding_prevalence"),
        ({"finding_prevalence": {"ditf": 1.5}}, "finding_prevalence\\['ditf'\\]"),
        ({"finding_prevalence": {"bone": 0.2}}, "bone_irregularity .* must not exceed bone"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_msk_dataset(tmp_path, **options)
    assert not list(tmp_path.rglob("*.nii.gz"))


# ------------------------------------------------------------------------------------------------- anatomy


def test_every_class_occurs_in_a_small_dataset(dataset):
    assert set(np.unique(dataset["labels"]).tolist()) == set(range(len(CLASS_NAMES)))


def test_the_first_four_subjects_carry_every_finding(dataset):
    for seed in range(5):
        subjects = [sample_msk_subject(seed, index) for index in range(4)]
        assert subjects[0].ditf is not None and subjects[1].calcification is not None
        assert subjects[2].bone_irregularity is not None and subjects[2].has_bone
        assert subjects[3].anisotropy_band_mm is not None
    first_four = [i for i, entry in enumerate(dataset["entries"]) if int(entry["subject"].removeprefix("sub-")) < 4]
    assert set(np.unique(dataset["labels"][first_four]).tolist()) == set(range(len(CLASS_NAMES)))


def test_finding_prevalence_sets_the_fraction_of_subjects_with_a_finding():
    indices = range(4, 104)  # past the subjects that carry a finding by rule
    default = [sample_msk_subject(0, index) for index in indices]
    assert abs(np.mean([s.ditf is not None for s in default]) - PREVALENCE["ditf"]) < 0.12
    assert abs(np.mean([s.has_bone for s in default]) - PREVALENCE["bone"]) < 0.12
    assert all(s.has_bone for s in default if s.bone_irregularity is not None)
    assert all(sample_msk_subject(0, index, {"ditf": 1.0}).ditf is not None for index in indices[:20])
    assert all(sample_msk_subject(0, index, {"ditf": 0.0}).ditf is None for index in range(20))
    # presence changes, the anatomy does not
    assert sample_msk_subject(0, 5, {"ditf": 1.0}).tendon_mm == sample_msk_subject(0, 5, {"ditf": 0.0}).tendon_mm


def test_frames_of_a_subject_show_the_same_anatomy_slightly_moved(dataset):
    labels, entries = dataset["labels"], dataset["entries"]
    for subject in {entry["subject"] for entry in entries}:
        tendons = [labels[i] == TENDON for i, entry in enumerate(entries) if entry["subject"] == subject]
        for first, second in zip(tendons, tendons[1:]):
            dice = 2 * (first & second).sum() / (first.sum() + second.sum())
            assert 0.7 < dice < 1.0


def test_full_grid_draws_the_demo_grid_anatomy_at_eight_times_the_resolution():
    subject = sample_msk_subject(0, 2)
    image, label = render_msk_frame(subject, DEVICES[0], GRIDS["full"], ProbePose(), np.random.default_rng(0))
    assert image.shape == label.shape == (512, 512) and image.dtype == np.float32
    demo_label = render_msk_frame(subject, DEVICES[0], GRID, ProbePose(), np.random.default_rng(0))[1]
    assert np.mean(label[4::8, 4::8] == demo_label) > 0.95


# ------------------------------------------------------------------------------------------ echotexture rules


def _class_means(images: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    return {c: float(images[labels == c].mean()) for c in range(len(CLASS_NAMES))}


def test_class_brightness_follows_the_echotexture_rules(dataset):
    means = _class_means(dataset["images"], dataset["labels"])
    assert means[BONE] > means[TENDON] + 0.1
    assert means[TENDON] > means[MUSCLE] + 0.2
    assert means[CALCIFICATION] > means[TENDON] + 0.05
    assert means[BONE_IRREGULARITY] > means[TENDON]
    assert means[ANISOTROPY] < means[TENDON] - 0.1
    assert means[DITF] < means[TENDON] - 0.2
    assert means[BACKGROUND] < means[MUSCLE]


def test_findings_are_darker_or_brighter_than_the_tendon_around_them_in_every_frame(dataset):
    checked = {DITF: 0, ANISOTROPY: 0}
    for image, label in zip(dataset["images"], dataset["labels"]):
        tendon = image[label == TENDON].mean()
        for finding in checked:
            if (label == finding).sum() >= 4:
                assert image[label == finding].mean() < tendon - 0.05
                checked[finding] += 1
    assert min(checked.values()) >= FRAMES


def test_bone_casts_an_acoustic_shadow(dataset):
    frames = 0
    for image, label in zip(dataset["images"], dataset["labels"]):
        bone = (label == BONE) | (label == BONE_IRREGULARITY)
        if bone.sum() < 20:
            continue
        shadow = _below(bone) & (label == BACKGROUND)
        assert image[shadow].mean() < 0.2
        assert image[shadow].mean() < image[label == TENDON].mean() - 0.25
        frames += 1
    assert frames >= FRAMES


def test_calcification_casts_a_shadow_on_the_tissue_beneath_it():
    """Tendon and bone pixels under a calcification are darker than the same tissue at the same depth beside it."""
    differences = []
    for index in range(8):
        subject = sample_msk_subject(0, index, {"calcification": 1.0, "ditf": 0.0, "anisotropy": 0.0})
        device = DEVICES[index % len(DEVICES)]
        image, label = render_msk_frame(subject, device, GRID, ProbePose(), np.random.default_rng(index))
        calcification = label == CALCIFICATION
        columns = np.flatnonzero(calcification.any(0))
        under = np.zeros_like(calcification)  # 7 pixels (2.8 mm) under the calcification's lowest pixel
        for column in columns:
            bottom = np.flatnonzero(calcification[:, column]).max()
            under[bottom + 1 : bottom + 8, column] = True
        beside_columns = np.ones(64, bool)
        beside_columns[max(columns.min() - 4, 0) : columns.max() + 5] = False
        beside = under.any(1)[:, None] & beside_columns[None]
        for tissue in (TENDON, BONE):
            if (under & (label == tissue)).sum() >= 3 and (beside & (label == tissue)).sum() >= 3:
                differences.append(image[under & (label == tissue)].mean() - image[beside & (label == tissue)].mean())
    assert len(differences) >= 6
    assert np.mean(differences) < -0.1


def test_tendon_texture_is_fibrillar_and_subcutis_is_not():
    """With a fine PSF, tendon pixels stay correlated 1.2 mm along the tendon but not 1.2 mm across it; the
    isotropic subcutis has no such difference."""
    tendon_anisotropy, subcutis_anisotropy = [], []
    for index in range(6):
        image, label = render_msk_frame(
            sample_msk_subject(0, index), DEVICES[0], GRID, ProbePose(), np.random.default_rng(index)
        )
        subcutis = (label == BACKGROUND) & (np.cumsum(label != BACKGROUND, axis=0) == 0)
        for mask, values in ((label == TENDON, tendon_anisotropy), (subcutis, subcutis_anisotropy)):
            values.append(_correlation(image, mask, 3, axis=1) - _correlation(image, mask, 3, axis=0))
    assert np.mean(tendon_anisotropy) > 0.3
    assert np.mean(tendon_anisotropy) > np.mean(subcutis_anisotropy) + 0.25


# ------------------------------------------------------------------------------------------------- devices


def test_devices_differ_in_speckle_size_and_grey_levels_at_equal_anatomy():
    """Two speckle draws of one anatomy differ by speckle only; its correlation length grows with the device's
    PSF (the devices are ordered by PSF width), and each device shows at most its number of grey levels."""
    subject = sample_msk_subject(0, 0)
    lateral, axial = [], []
    for device in DEVICES:
        images, label = [], None
        for repeat in range(4):
            image, label = render_msk_frame(subject, device, GRID, ProbePose(), np.random.default_rng(repeat))
            images.append(image)
        soft = ndimage.binary_erosion((label == TENDON) | (label == MUSCLE))
        speckle = [images[0] - images[1], images[2] - images[3]]
        lateral.append(np.mean([_correlation(difference, soft, 2, axis=1) for difference in speckle]))
        axial.append(np.mean([_correlation(difference, soft, 1, axis=0) for difference in speckle]))
        assert len(np.unique(np.stack(images))) <= device.grey_levels
    assert np.all(np.diff(lateral) > 0.03), lateral
    assert np.all(np.diff(axial) > 0.1), axial
    np.testing.assert_allclose(images[0] * 31, np.round(images[0] * 31), atol=1e-4)  # the pocket's 32 levels
    assert len(np.unique(render_msk_frame(subject, DEVICES[0], GRID, ProbePose(), np.random.default_rng(0))[0])) > 64


def _gram_descriptor(image: np.ndarray) -> np.ndarray:
    """Gram matrix of a small filter bank's responses (image, lateral and axial differences, blur, Laplacian) and
    the mean: a texture descriptor in the spirit of Gatys style features."""
    centred = image - image.mean()
    responses = [
        centred, np.diff(centred, axis=1, append=centred[:, -1:]), np.diff(centred, axis=0, append=centred[-1:]),
        ndimage.gaussian_filter(centred, 1.5), ndimage.laplace(centred),
    ]  # fmt: skip
    features = np.stack([response.ravel() for response in responses])
    gram = features @ features.T / features.shape[1]
    return np.concatenate([gram[np.triu_indices(len(gram))], [image.mean()]])


def test_gram_texture_descriptors_tell_devices_apart_across_subjects(dataset):
    descriptors = np.stack([_gram_descriptor(image) for image in dataset["images"]])
    descriptors = (descriptors - descriptors.mean(0)) / descriptors.std(0)
    devices = np.array([entry["device"] for entry in dataset["entries"]])
    subjects = np.array([entry["subject"] for entry in dataset["entries"]])
    distances = ((descriptors[:, None] - descriptors[None]) ** 2).sum(-1)
    distances[subjects[:, None] == subjects[None]] = np.inf  # the nearest image of another subject
    accuracy = np.mean(devices[distances.argmin(1)] == devices)
    assert accuracy >= 0.8  # chance 0.25


# ------------------------------------------------------------------------------------------ speckle simulator


def test_simulator_is_seeded():
    backscatter = np.full((32, 32), 0.01)
    first = simulate_bmode(backscatter, None, DEVICES[1], 0.2, np.random.default_rng(3))
    second = simulate_bmode(backscatter, None, DEVICES[1], 0.2, np.random.default_rng(3))
    third = simulate_bmode(backscatter, None, DEVICES[1], 0.2, np.random.default_rng(4))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, third)
    assert first.dtype == np.float32 and first.shape == (32, 32)
    assert simulate_bmode(backscatter, None, DEVICES[1], 0.2, np.random.default_rng(3), supersample=2).shape == (16, 16)


def test_transmission_and_log_compression_follow_their_formulas():
    attenuation = np.full((10, 3), 2.0)  # dB/mm
    np.testing.assert_allclose(transmission(attenuation, 0.5)[:, 0], 10 ** (-(np.arange(10) + 0.5) * 0.5 * 2 / 10))
    intensity = 10 ** (np.array([-60.0, -40.0, -20.0, 0.0, 10.0]) / 10)
    np.testing.assert_allclose(log_compress(intensity, 40.0), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(log_compress(intensity, 40.0, gain_db=20.0), [0.0, 0.5, 1.0, 1.0, 1.0])


def test_psf_keeps_the_mean_power_and_dense_scatterers_give_rayleigh_speckle():
    rng = np.random.default_rng(0)
    power = np.full((256, 256), 0.5)
    dense = np.abs(apply_psf(scatterer_field(power, 0.05, 400.0, rng), 0.05, 0.1, 0.2)) ** 2
    assert abs(dense.mean() / 0.5 - 1.0) < 0.05
    assert abs(dense.std() / dense.mean() - 1.0) < 0.1  # exponential intensity: contrast 1
    sparse = np.abs(apply_psf(scatterer_field(power, 0.05, 4.0, rng), 0.05, 0.1, 0.2)) ** 2
    assert abs(sparse.mean() / 0.5 - 1.0) < 0.2
    assert sparse.std() / sparse.mean() > 1.5  # few scatterers per resolution cell: spotty, non-Rayleigh


def test_wider_psf_gives_larger_speckle():
    backscatter = np.full((64, 128), 0.01)
    narrow = simulate_bmode(backscatter, None, replace(PLAIN, lateral_psf_mm=0.1), 0.1, np.random.default_rng(0))
    wide = simulate_bmode(backscatter, None, replace(PLAIN, lateral_psf_mm=0.4), 0.1, np.random.default_rng(0))
    everywhere = np.ones_like(narrow, dtype=bool)
    assert _correlation(wide, everywhere, 2, axis=1) > _correlation(narrow, everywhere, 2, axis=1) + 0.4
    assert abs(_correlation(wide, everywhere, 2, axis=0) - _correlation(narrow, everywhere, 2, axis=0)) < 0.1


@pytest.mark.parametrize("inclusion_attenuation, sign", [(10.0, -1), (0.0, 1)])
def test_strong_attenuators_shadow_and_weak_ones_enhance_what_lies_below(inclusion_attenuation, sign):
    backscatter = np.full((128, 128), 0.01)
    attenuation = np.full((128, 128), 1.0)
    attenuation[30:50, 44:84] = inclusion_attenuation
    device = replace(PLAIN, tgc_db_per_mm=1.0, dynamic_range_db=60.0)
    image = simulate_bmode(backscatter, attenuation, device, 0.1, np.random.default_rng(0))
    below, beside = image[60:120, 50:78].mean(), np.concatenate([image[60:120, :30], image[60:120, -30:]]).mean()
    assert sign * (below - beside) > 0.02
    expected_db = (1.0 - inclusion_attenuation) * 20 * 0.1  # two-way loss difference through the inclusion
    assert abs((below - beside) * 60.0 - expected_db) < 1.5


def test_simulator_and_device_reject_bad_arguments():
    with pytest.raises(ValueError, match="backscatter must be a 2D"):
        simulate_bmode(np.ones(5), None, PLAIN, 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="attenuation_db_per_mm must have the shape"):
        simulate_bmode(np.ones((4, 4)), np.ones((4, 5)), PLAIN, 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="supersample must be an integer >= 1 dividing"):
        simulate_bmode(np.ones((6, 6)), None, PLAIN, 0.1, np.random.default_rng(0), supersample=4)
    with pytest.raises(ValueError, match="pixel_mm must be > 0"):
        simulate_bmode(np.ones((4, 4)), None, PLAIN, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="grey_levels must be >= 2"):
        replace(PLAIN, grey_levels=1)
    with pytest.raises(ValueError, match="lateral_psf_mm must be > 0"):
        replace(PLAIN, lateral_psf_mm=0.0)
