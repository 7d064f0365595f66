"""Synthetic brain MRI demo data made from the MNI152 2009 template that ships with nilearn.

Source
    nilearn's bundled ICBM 2009a nonlinear symmetric files in ``nilearn/datasets/data/`` (T1, grey-matter and
    white-matter maps, 197 x 233 x 189 voxels at 1 mm, uint8). They are read from inside the installed package, the
    way ``nilearn.datasets.load_mni152_template`` and friends read them, so nothing is downloaded.

Tissue maps (template space, probabilities)
    brain mask = T1 / max(T1) > 0.2 (the rule of ``nilearn.datasets.load_mni152_brain_mask``);
    GM, WM = nilearn's maps / max, times the brain mask (the maps reach a few mm past the skull-stripped T1);
    intracranial mask = the brain mask closed with a 6 mm ball (bridging the sulci), dilated by a 3 mm ball and
        hole-filled: the skull-stripped template leaves out the subarachnoid CSF around the cortex, which
        segmentations of a single subject (e.g. GIF, as in the brainSPADE paper) label as CSF. This brings CSF to
        about 20 % of the intracranial volume, as in adults, instead of the 10 % of the stripped template;
    CSF = intracranial mask - GM - WM, clipped to >= 0; background = 1 - CSF - GM - WM.
    nilearn has no deep-grey-matter or brainstem maps, so the project's full layout (background, CSF, GM, WM, DGM,
    brainstem, WMH, tumour core, oedema, enhancing) cannot be made here: deep grey matter and brainstem are part of
    the GM and WM channels.

Subject anatomy: one coordinate map from subject mm to template mm, composed of
    1. a global affine about the brain centre: rotation +-5 deg, scale +-5 % and translation +-3 mm, per axis;
    2. plus a smooth displacement of the subject position: normal displacements on an 8 x 8 x 8 lattice over the
       brain (26-31 mm apart), Gaussian-smoothed (sigma 1 node), cubic-spline interpolated, RMS 1.5-3 mm per axis;
    3. atrophy: a radial push-out around each lateral ventricle, x <- x - s (x - c) exp(-d^2 / 2), with c the
       ventricle centroid, d the Mahalanobis distance for 1.5 x the ventricle's spatial spread, and strength
       s ~ U(0, 0.3) per subject (x U(0.85, 1.15) per side), which enlarges a ventricle up to 1 / (1 - s) times
       linearly at its centre.
    The template maps, Gaussian-smoothed against aliasing (sigma = sqrt(spacing^2 - 1 mm^2) / 2.355), are sampled
    once through this map, trilinearly (``scipy.ndimage.map_coordinates``, order 1), directly on the output grid.

Lesion rules (defined in template mm, so they deform with the anatomy; edges are logistic, max(1 mm, half a
voxel) wide, so every map is soft)
    WMH, present with p = 0.5: 3-8 Gaussian blobs (sigma 2-4.5 mm per axis) centred on template voxels with
        WM > 0.8 lying 3-12 mm from the lateral ventricles; wmh = WM x (max over blobs) x (1 - tumour extent).
    Tumour, present with p = 0.5 independently of WMH, centred on a template voxel with WM > 0.5, |x| >= 20 mm,
        z >= -10 mm, >= 15 mm inside the brain and >= 5 mm from the ventricles:
        core = ellipsoid with semi-axes 8-15 mm and random orientation, made irregular by placing its surface at
        radius 1 + a n(u) (in semi-axes), n smooth unit-variance noise of the position u (cubic spline on a lattice
        0.5 semi-axes apart), clipped at +-2, a ~ U(0.12, 0.25);
        enhancing = the outer 1.5-3.5 mm of the core (the rim at its boundary); tumour = the core inside the rim;
        oedema = the same with its own noise and surface at k (1 + a n), k ~ U(1.6, 2.3), a ~ U(0.15, 0.25),
        minus the core;
        all three are confined to the tumour's hemisphere and to the parenchyma (scaled by GM + WM, so the
        ventricles and sulci keep their CSF).
    Lesions take their probability mass from every tissue channel (tissue <- tissue x (1 - sum of lesions)), so the
    channels sum to 1 in every voxel. A lesion channel left out of ``channels`` is not simulated.

Images (float32 in [0, 1], zero outside the brain, i.e. where the background probability is >= 0.5)
    T1: the warped template T1; lesions replace it with their own intensity (tumour 0.35, enhancing 0.55 (no
        contrast agent), oedema 0.6, WMH 0.7; template WM is ~0.87), mixed by their probabilities.
    T2-like and FLAIR-like: SIMULATED, not measured: sum over channels of probability x class mean (``IMAGE_MEANS``):
        T2 with bright CSF and lesions and dark WM, FLAIR with dark CSF and bright WMH and oedema.
    Each image is multiplied by a smooth random bias field exp(b) (4 x 4 x 4 lattice, b has RMS 4-10 %), gets
    Rician-like noise sqrt((I + n1)^2 + n2^2) with n1, n2 ~ N(0, sigma^2), sigma ~ U(0.01, 0.03), is skull-stripped
    and clipped to [0, 1].

Files (``OUT/<grid>/``)
    ``3d/sub-XXX_label.nii.gz`` (X x Y x Z x C, channels last, float32) and ``3d/sub-XXX_{t1,t2,flair}.nii.gz``
    (X x Y x Z); ``2d/sub-XXX_zNNN_*.nii.gz`` axial slices as X x Y x 1 x C and X x Y x 1, so the affine keeps the slice
    position; ``datalist_3d.json`` and ``datalist_2d.json`` in MONAI's format with paths relative to their folder.
    Affines map voxels to millimetres in the template's RAS (MNI) frame, so all files of a subject overlay.
    Subjects are split by subject, in order: training, then validation, then test (they are i.i.d.).

Determinism
    Subject i is drawn from ``numpy.random.default_rng([seed, i])`` only, so ``n_subjects=10`` gives the first 10
    subjects of ``n_subjects=40``, and files are byte-identical between runs (gzip header time stamp 0, no file name).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special

from ..writers import save_nifti, write_json
from .splits import check_dataset_arguments, split_names

__all__ = [
    "BRAIN_CHANNELS",
    "LESION_CHANNELS",
    "DEFAULT_CHANNELS",
    "TISSUE_CHANNELS",
    "IMAGE_KEYS",
    "IMAGE_MEANS",
    "T1_LESION_MEANS",
    "GRIDS",
    "Grid",
    "BrainSubject",
    "Tumour",
    "axial_brain_planes",
    "make_brain_dataset",
    "sample_brain_subject",
]

TISSUE_CHANNELS = ("background", "csf", "gm", "wm")
LESION_CHANNELS = ("wmh", "tumour", "oedema", "enhancing")
BRAIN_CHANNELS = TISSUE_CHANNELS + LESION_CHANNELS
DEFAULT_CHANNELS = BRAIN_CHANNELS
IMAGE_KEYS = ("t1", "t2", "flair")
SPLITS = ("training", "validation", "test")

# per-class mean intensity of the simulated contrasts
IMAGE_MEANS = {
    "t2": {
        "background": 0.0, "csf": 0.9, "gm": 0.55, "wm": 0.35,
        "wmh": 0.75, "tumour": 0.85, "oedema": 0.8, "enhancing": 0.65,
    },
    "flair": {
        "background": 0.0, "csf": 0.08, "gm": 0.5, "wm": 0.38,
        "wmh": 0.9, "tumour": 0.6, "oedema": 0.95, "enhancing": 0.7,
    },
}  # fmt: skip
# T1 intensity a lesion replaces the template T1 with
T1_LESION_MEANS = {"wmh": 0.7, "tumour": 0.35, "oedema": 0.6, "enhancing": 0.55}


@dataclass(frozen=True)
class Grid:
    """An output grid of ``shape`` (X, Y, Z) voxels, each ``spacing_mm`` wide, centred on the brain."""

    shape: tuple[int, int, int]
    spacing_mm: float


GRIDS = {
    "1mm": Grid((160, 176, 112), 1.0),  # the brainSPADE paper's crop
    "2mm": Grid((96, 128, 96), 2.0),
    "demo": Grid((56, 72, 64), 3.0),  # 168 x 216 x 192 mm: the intracranial volume with room to move
}

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_BRAIN_MASK_THRESHOLD = 0.2
_SULCUS_CLOSING_MM = 6  # radius of the ball that closes the brain mask over the sulci
_SUBARACHNOID_MM = 3  # thickness of the CSF layer added around the closed brain mask
_CROP_MARGIN_VOXELS = 12  # room for the anti-aliasing filter around the brain
_LATTICE_MARGIN_MM = 20.0  # random lattices cover the brain's bounding box plus this margin
_DEFORMATION_NODES = 8
_BIAS_NODES = 4
_VENTRICLE_REACH = 1.5  # push-out width in units of the ventricle's spatial spread
_TUMOUR_NOISE_HALF_WIDTH = 6.0  # tumour noise lattices span [-6, 6] core radii, 0.5 apart
_TUMOUR_NOISE_NODES = 25
_NOISE_CLIP = 2.0
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_MIN_SLICE_BRAIN_AREA = 0.5  # 2D slices come from axial planes with at least this fraction of the largest brain area
_GZIP_LEVEL = 1


@dataclass(frozen=True)
class _Template:
    """The MNI152 2009 maps at 1 mm, cropped around the brain, and the sites lesions are placed at (world mm)."""

    maps: np.ndarray  # (4, X, Y, Z) float32: t1, csf, gm, wm
    origin_mm: np.ndarray  # (3,) world position of maps[:, 0, 0, 0]
    brain_centre_mm: np.ndarray  # (3,) centre of the brain mask's bounding box
    lattice_lower_mm: np.ndarray  # (3,) corner of the box random lattices span
    lattice_upper_mm: np.ndarray  # (3,)
    ventricle_centres_mm: np.ndarray  # (2, 3) left, right lateral ventricle
    ventricle_precisions: np.ndarray  # (2, 3, 3) inverse covariance of the push-out, 1 / mm^2
    wmh_sites_mm: np.ndarray  # (K, 3) periventricular white matter
    tumour_sites_mm: np.ndarray  # (M, 3) deep hemispheric white matter


@dataclass(frozen=True)
class Tumour:
    """Shape of one tumour, in template mm (see the module docstring for the rules)."""

    centre_mm: np.ndarray  # (3,)
    axes: np.ndarray  # (3, 3) orthonormal, columns are the ellipsoid's axes
    semi_axes_mm: np.ndarray  # (3,) of the core
    rim_mm: float  # thickness of the enhancing rim
    oedema_scale: float  # oedema ellipsoid size / core ellipsoid size
    core_roughness: float  # amplitude a of the noise on the core surface radius, in semi-axes
    oedema_roughness: float
    core_noise: np.ndarray  # (N, N, N) unit-variance smooth noise over [-6, 6]^3 core radii
    oedema_noise: np.ndarray  # (N, N, N)


@dataclass(frozen=True)
class BrainSubject:
    """Random parameters of one synthetic subject; a function of (seed, index) only."""

    rotation: np.ndarray  # (3, 3)
    scale: np.ndarray  # (3,)
    translation_mm: np.ndarray  # (3,)
    displacement_mm: np.ndarray  # (3, L, L, L) displacement lattice of the smooth deformation
    ventricle_push: np.ndarray  # (2,) push-out strength at the left and right lateral ventricle
    wmh_centres_mm: np.ndarray  # (K, 3), K = 0 without WMH
    wmh_sigmas_mm: np.ndarray  # (K, 3)
    tumour: Tumour | None
    log_bias: np.ndarray  # (3, B, B, B) log bias field lattices of t1, t2, flair
    noise_sigma: np.ndarray  # (3,) Rician noise level of t1, t2, flair


def _nilearn_data_dir() -> Path:
    """Folder of nilearn's bundled data files, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ImportError("nilearn is not installed; its bundled MNI152 2009 files are the brain demo data's source.")
    return Path(spec.origin).parent / "datasets" / "data"


def _world_coordinates(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World mm of every voxel of a grid, (3, prod(shape)) float64, in C order."""
    voxels = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return affine[:3, :3] @ voxels + affine[:3, 3:]


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    """Read nilearn's MNI152 2009 files, derive CSF, crop to the brain and find the lesion sites (cached)."""
    data_dir = _nilearn_data_dir()
    images = {name: nib.load(data_dir / filename) for name, filename in _TEMPLATE_FILES.items()}
    affine = images["t1"].affine
    t1, gm, wm = (np.asarray(images[name].dataobj, dtype=np.float32) for name in ("t1", "gm", "wm"))
    t1, gm, wm = t1 / t1.max(), gm / gm.max(), wm / wm.max()
    mask = t1 > _BRAIN_MASK_THRESHOLD
    gm, wm = gm * mask, wm * mask
    intracranial = _intracranial_mask(mask)
    csf = np.clip(intracranial - gm - wm, 0.0, None)

    brain_voxels = np.argwhere(intracranial)
    low = np.maximum(brain_voxels.min(0) - _CROP_MARGIN_VOXELS, 0)
    high = np.minimum(brain_voxels.max(0) + _CROP_MARGIN_VOXELS + 1, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(low, high))
    origin_mm = affine[:3, :3] @ low + affine[:3, 3]
    brain_low_mm = affine[:3, :3] @ brain_voxels.min(0) + affine[:3, 3]
    brain_high_mm = affine[:3, :3] @ brain_voxels.max(0) + affine[:3, 3]

    ventricles = _lateral_ventricles((mask - gm - wm) > 0.5, affine, brain_low_mm, brain_high_mm)
    ventricle_mm = affine[:3, :3] @ np.argwhere(ventricles).T + affine[:3, 3:]
    ventricle_centres, ventricle_precisions = [], []
    for side in (ventricle_mm[0] < -2.0, ventricle_mm[0] > 2.0):  # left, right; the septum lies at x = 0
        points = ventricle_mm[:, side]
        ventricle_centres.append(points.mean(1))
        ventricle_precisions.append(np.linalg.inv(_VENTRICLE_REACH**2 * np.cov(points)))

    # lesion sites on a 2 mm subsample: plenty of candidates, cheap distance transforms
    every_other = (slice(None, None, 2),) * 3
    ventricle_distance = ndimage.distance_transform_edt(~ventricles[every_other], sampling=2.0)
    depth = ndimage.distance_transform_edt(mask[every_other], sampling=2.0)
    wm_2mm = wm[every_other]
    site_world = _world_coordinates(wm_2mm.shape, affine @ np.diag([2.0, 2.0, 2.0, 1.0])).reshape(3, *wm_2mm.shape)
    wmh_sites = (wm_2mm > 0.8) & (ventricle_distance >= 3.0) & (ventricle_distance <= 12.0)
    tumour_sites = (
        (wm_2mm > 0.5) & (np.abs(site_world[0]) >= 20.0) & (site_world[2] >= -10.0) & (depth >= 15.0)
        & (ventricle_distance >= 5.0)
    )  # fmt: skip
    return _Template(
        maps=np.ascontiguousarray(np.stack([t1, csf, gm, wm])[(slice(None),) + crop]),
        origin_mm=origin_mm,
        brain_centre_mm=(brain_low_mm + brain_high_mm) / 2.0,
        lattice_lower_mm=brain_low_mm - _LATTICE_MARGIN_MM,
        lattice_upper_mm=brain_high_mm + _LATTICE_MARGIN_MM,
        ventricle_centres_mm=np.stack(ventricle_centres),
        ventricle_precisions=np.stack(ventricle_precisions),
        wmh_sites_mm=site_world[:, wmh_sites].T,
        tumour_sites_mm=site_world[:, tumour_sites].T,
    )


def _intracranial_mask(brain: np.ndarray) -> np.ndarray:
    """Brain mask (1 mm voxels) closed over the sulci, grown by the subarachnoid CSF layer and hole-filled.
    Morphology by Euclidean distance transforms: a ball of radius r dilates to distance <= r and erodes to > r."""
    pad = _SULCUS_CLOSING_MM + _SUBARACHNOID_MM + 1
    brain = np.pad(brain, pad)
    dilated = ndimage.distance_transform_edt(~brain) <= _SULCUS_CLOSING_MM
    closed = ndimage.distance_transform_edt(dilated) > _SULCUS_CLOSING_MM
    grown = ndimage.distance_transform_edt(~closed) <= _SUBARACHNOID_MM
    return ndimage.binary_fill_holes(grown[pad:-pad, pad:-pad, pad:-pad])


def _lateral_ventricles(csf_core: np.ndarray, affine: np.ndarray, brain_low_mm, brain_high_mm) -> np.ndarray:
    """Boolean mask of the lateral ventricles: the largest CSF component within 50 mm of the brain centre."""
    components, count = ndimage.label(csf_core)
    centre_voxel = np.linalg.solve(affine[:3, :3], (brain_low_mm + brain_high_mm) / 2.0 - affine[:3, 3])
    reach_voxels = 50.0 / np.abs(np.diag(affine[:3, :3]))
    sizes = ndimage.sum_labels(csf_core, components, index=np.arange(1, count + 1))
    boxes = ndimage.find_objects(components)
    for label in np.argsort(-sizes, kind="stable") + 1:
        corners = np.array([[s.start for s in boxes[label - 1]], [s.stop - 1 for s in boxes[label - 1]]])
        if np.all(np.abs(corners - centre_voxel) <= reach_voxels):
            return components == label
    raise RuntimeError("no lateral ventricles found in the MNI152 CSF map.")


@functools.lru_cache(maxsize=len(GRIDS))
def _antialiased_maps(spacing_mm: float) -> np.ndarray:
    """The template maps (4, X, Y, Z) smoothed for sampling at ``spacing_mm`` (cached per spacing)."""
    maps = _load_template().maps
    sigma_mm = math.sqrt(max(spacing_mm**2 - 1.0, 0.0)) / _FWHM_PER_SIGMA
    if sigma_mm == 0.0:
        return maps
    return np.stack([ndimage.gaussian_filter(m, sigma_mm, mode="constant") for m in maps])


def _smooth_noise(rng: np.random.Generator, count: int, nodes: int) -> np.ndarray:
    """``count`` independent smooth random lattices (count, nodes, nodes, nodes), each of unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal((count, nodes, nodes, nodes)), sigma=(0, 1, 1, 1))
    return noise / noise.std(axis=(1, 2, 3), keepdims=True)


def _sample_lattice(lattice: np.ndarray, points: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Cubic-spline interpolation of a lattice (N, N, N) spanning the box [lower, upper] at points (3, P);
    constant beyond the box."""
    nodes = np.asarray(lattice.shape, dtype=np.float64)[:, None]
    coordinates = (points - lower[:, None]) / (upper - lower)[:, None] * (nodes - 1.0)
    return ndimage.map_coordinates(lattice, coordinates, order=3, mode="nearest")


def _lattices_on_grid(lattices: np.ndarray, grid: Grid, affine: np.ndarray, lower: np.ndarray, upper: np.ndarray):
    """Cubic-spline interpolation of lattices (K, L, L, L) spanning the box [lower, upper] at every voxel of an
    axis-aligned grid, (K, X, Y, Z); constant beyond the box. Splines are separable, so this is three small matrices."""
    weights = []
    for axis, size in enumerate(grid.shape):
        nodes = lattices.shape[1 + axis]
        voxel_mm = affine[axis, axis] * np.arange(size) + affine[axis, 3]
        position = (voxel_mm - lower[axis]) / (upper[axis] - lower[axis]) * (nodes - 1.0)
        basis = [ndimage.map_coordinates(unit, position[None], order=3, mode="nearest") for unit in np.eye(nodes)]
        weights.append(np.stack(basis, axis=1))  # (size, nodes)
    return np.einsum("kabc,xa,yb,zc->kxyz", lattices, *weights, optimize=True)


def _rotation(angles_rad: Iterable[float]) -> np.ndarray:
    """Rotation matrix about x, then y, then z."""
    rotation = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    return rotation


def _sample_subject(rng: np.random.Generator, template: _Template) -> BrainSubject:
    """Draw one subject's parameters; the draws do not depend on the grid or the channels."""
    has_wmh, has_tumour = rng.random(2) < 0.5
    rotation = _rotation(np.deg2rad(rng.uniform(-5.0, 5.0, 3)))
    scale = rng.uniform(0.95, 1.05, 3)
    translation_mm = rng.uniform(-3.0, 3.0, 3)
    displacement_mm = rng.uniform(1.5, 3.0) * _smooth_noise(rng, 3, _DEFORMATION_NODES)
    ventricle_push = rng.uniform(0.0, 0.3) * rng.uniform(0.85, 1.15, 2)

    wmh_count = rng.integers(3, 9) if has_wmh else 0
    wmh_centres_mm = template.wmh_sites_mm[rng.integers(0, len(template.wmh_sites_mm), wmh_count)]
    wmh_sigmas_mm = rng.uniform(2.0, 4.5, (wmh_count, 3))

    tumour = None
    if has_tumour:
        axes, upper_triangle = np.linalg.qr(rng.standard_normal((3, 3)))
        core_noise, oedema_noise = _smooth_noise(rng, 2, _TUMOUR_NOISE_NODES)
        tumour = Tumour(
            centre_mm=template.tumour_sites_mm[rng.integers(len(template.tumour_sites_mm))],
            axes=axes * np.sign(np.diag(upper_triangle)),
            semi_axes_mm=rng.uniform(8.0, 15.0, 3),
            rim_mm=rng.uniform(1.5, 3.5),
            oedema_scale=rng.uniform(1.6, 2.3),
            core_roughness=rng.uniform(0.12, 0.25),
            oedema_roughness=rng.uniform(0.15, 0.25),
            core_noise=core_noise,
            oedema_noise=oedema_noise,
        )
    log_bias = rng.uniform(0.04, 0.1, (3, 1, 1, 1)) * _smooth_noise(rng, 3, _BIAS_NODES)
    return BrainSubject(
        rotation=rotation,
        scale=scale,
        translation_mm=translation_mm,
        displacement_mm=displacement_mm,
        ventricle_push=ventricle_push,
        wmh_centres_mm=wmh_centres_mm,
        wmh_sigmas_mm=wmh_sigmas_mm,
        tumour=tumour,
        log_bias=log_bias,
        noise_sigma=rng.uniform(0.01, 0.03, 3),
    )


def sample_brain_subject(seed: int, index: int) -> BrainSubject:
    """Parameters of subject ``index`` of a dataset made with ``seed`` (what ``make_brain_dataset`` draws).

    Parameters
    ----------
    seed : int
        Dataset seed, >= 0.
    index : int
        Subject number, >= 0.

    Returns
    -------
    BrainSubject
        ``tumour is None`` when the subject has no tumour; ``len(wmh_centres_mm) == 0`` when it has no WMH.
    """
    return _sample_subject(np.random.default_rng([seed, index]), _load_template())


def _subject_to_template(
    subject: BrainSubject, template: _Template, grid: Grid, affine: np.ndarray, world_mm: np.ndarray
) -> np.ndarray:
    """Map the grid's voxels, at subject world mm (3, P), to template world mm (3, P): global affine plus smooth
    displacement (a function of the subject position), then the ventricle push-out."""
    centre = template.brain_centre_mm[:, None]
    points = centre + (subject.rotation * subject.scale) @ (world_mm - centre) + subject.translation_mm[:, None]
    displacement = _lattices_on_grid(
        subject.displacement_mm, grid, affine, template.lattice_lower_mm, template.lattice_upper_mm
    )
    points = points + displacement.reshape(3, -1)
    for ventricle, precision, strength in zip(
        template.ventricle_centres_mm, template.ventricle_precisions, subject.ventricle_push
    ):
        offset = points - ventricle[:, None]
        squared_distance = np.einsum("ip,ij,jp->p", offset, precision, offset)
        points = points - strength * offset * np.exp(-0.5 * squared_distance)
    return points


def _soft_inside(radius: np.ndarray, surface: np.ndarray, length_mm: float, edge_mm: float) -> np.ndarray:
    """Logistic indicator of ``radius < surface``; ``length_mm`` converts radius units to mm."""
    return special.expit((surface - radius) * (length_mm / edge_mm))


def _tumour_maps(tumour: Tumour, points_mm: np.ndarray, edge_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft maps (P,) of the core inside the rim, the enhancing rim and the oedema shell, before confinement."""
    unit = (tumour.axes.T @ (points_mm - tumour.centre_mm[:, None])) / tumour.semi_axes_mm[:, None]
    radius = np.linalg.norm(unit, axis=0)  # in core semi-axes
    # surface radius at each position; beyond the noise box it is 0, far inside the point, so the maps are ~0 there
    near = radius < _TUMOUR_NOISE_HALF_WIDTH
    box = np.full(3, _TUMOUR_NOISE_HALF_WIDTH)
    core_surface, oedema_surface = np.zeros(radius.shape), np.zeros(radius.shape)
    core_noise, oedema_noise = (
        np.clip(_sample_lattice(noise, unit[:, near], -box, box), -_NOISE_CLIP, _NOISE_CLIP)
        for noise in (tumour.core_noise, tumour.oedema_noise)
    )
    core_surface[near] = 1.0 + tumour.core_roughness * core_noise
    oedema_surface[near] = tumour.oedema_scale * (1.0 + tumour.oedema_roughness * oedema_noise)

    mean_axis_mm = float(tumour.semi_axes_mm.mean())
    core = _soft_inside(radius, core_surface, mean_axis_mm, edge_mm)
    inside_rim = _soft_inside(radius, core_surface - tumour.rim_mm / mean_axis_mm, mean_axis_mm, edge_mm)
    oedema_extent = np.maximum(_soft_inside(radius, oedema_surface, mean_axis_mm, edge_mm), core)
    return inside_rim, core - inside_rim, oedema_extent - core


def _wmh_blobs(centres_mm: np.ndarray, sigmas_mm: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Pointwise maximum (P,) of anisotropic Gaussian blobs of peak 1."""
    blobs = np.zeros(points_mm.shape[1])
    for centre, sigma in zip(centres_mm, sigmas_mm):
        squared_distance = (((points_mm - centre[:, None]) / sigma[:, None]) ** 2).sum(0)
        np.maximum(blobs, np.exp(-0.5 * squared_distance), out=blobs)
    return blobs


def _render_subject(
    subject: BrainSubject, template: _Template, grid: Grid, affine: np.ndarray, channels: Sequence[str],
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Label map (X, Y, Z, C) and images {"t1", "t2", "flair"} (X, Y, Z), float32, of one subject on one grid."""
    world_mm = _world_coordinates(grid.shape, affine)
    template_mm = _subject_to_template(subject, template, grid, affine, world_mm)
    template_voxels = template_mm - template.origin_mm[:, None]  # the template has 1 mm voxels
    t1, csf, gm, wm = (
        ndimage.map_coordinates(m, template_voxels, order=1, mode="constant", cval=0.0)
        for m in _antialiased_maps(grid.spacing_mm)
    )
    brain = np.clip(csf + gm + wm, 0.0, 1.0)
    edge_mm = max(1.0, grid.spacing_mm / 2.0)

    lesions = {name: np.zeros_like(brain) for name in LESION_CHANNELS}
    if subject.tumour is not None:
        side = np.sign(subject.tumour.centre_mm[0])
        confinement = (gm + wm) * special.expit(side * template_mm[0] / edge_mm)
        parts = _tumour_maps(subject.tumour, template_mm, edge_mm)
        for name, part in zip(("tumour", "enhancing", "oedema"), parts):
            if name in channels:
                lesions[name] = (part * confinement).astype(np.float32)
    if "wmh" in channels:
        tumour_extent = lesions["tumour"] + lesions["enhancing"] + lesions["oedema"]
        blobs = _wmh_blobs(subject.wmh_centres_mm, subject.wmh_sigmas_mm, template_mm)
        lesions["wmh"] = (wm * blobs * (1.0 - tumour_extent)).astype(np.float32)

    lesion_total = sum(lesions.values())
    tissue_share = 1.0 - lesion_total
    probabilities = {
        "background": (1.0 - brain) * tissue_share,
        "csf": csf * tissue_share,
        "gm": gm * tissue_share,
        "wm": wm * tissue_share,
        **lesions,
    }
    label = np.stack([probabilities[name] for name in channels], axis=-1).reshape(*grid.shape, len(channels))

    clean = {
        "t1": t1 * tissue_share + sum(lesions[name] * T1_LESION_MEANS[name] for name in LESION_CHANNELS),
        **{key: sum(probabilities[name] * means[name] for name in channels) for key, means in IMAGE_MEANS.items()},
    }
    in_brain = probabilities["background"] < 0.5
    log_bias_fields = _lattices_on_grid(
        subject.log_bias, grid, affine, template.lattice_lower_mm, template.lattice_upper_mm
    ).reshape(len(IMAGE_KEYS), -1)
    images = {}
    for key, log_bias, sigma in zip(IMAGE_KEYS, log_bias_fields, subject.noise_sigma):
        biased = clean[key] * np.exp(log_bias)
        noise = sigma * rng.standard_normal((2, biased.size))
        noisy = np.sqrt((biased + noise[0]) ** 2 + noise[1] ** 2)
        images[key] = np.clip(noisy * in_brain, 0.0, 1.0).astype(np.float32).reshape(grid.shape)
    return label.astype(np.float32), images


def _grid_affine(grid: Grid, centre_mm: np.ndarray) -> np.ndarray:
    """Voxel-to-world (RAS mm) affine of a grid whose centre lies at ``centre_mm``."""
    affine = np.diag([grid.spacing_mm] * 3 + [1.0])
    affine[:3, 3] = centre_mm - grid.spacing_mm * (np.asarray(grid.shape) - 1) / 2.0
    return affine


def _write_case(
    grid_dir: Path, stem: str, label: np.ndarray, images: dict[str, np.ndarray], affine: np.ndarray,
    channels: Sequence[str], voxel_volume_mm3: float,
) -> dict:
    """Write a label map and its images as ``grid_dir/stem_*.nii.gz``; return the datalist entry (relative paths)."""
    entry = {}
    for key, array in (("label", label), *images.items()):
        relative = f"{stem}_{key}.nii.gz"
        save_nifti(array, grid_dir / relative, affine, channel_first=False, compresslevel=_GZIP_LEVEL)
        entry[key] = relative
    entry["lesion_volume_mm3"] = {
        name: round(float(label[..., channels.index(name)].sum(dtype=np.float64)) * voxel_volume_mm3, 3)
        for name in LESION_CHANNELS
        if name in channels
    }
    return entry


def axial_brain_planes(brain: np.ndarray, count: int | None = None) -> np.ndarray:
    """``count`` evenly spaced z indices among the axial planes of ``brain`` (X, Y, Z) with at least
    ``_MIN_SLICE_BRAIN_AREA`` x the largest brain area (all of them if there are fewer, or ``count`` is None)."""
    area = brain.sum(axis=(0, 1))
    candidates = np.flatnonzero(area >= _MIN_SLICE_BRAIN_AREA * area.max())
    count = len(candidates) if count is None else min(count, len(candidates))
    positions = (np.arange(count) + 0.5) * len(candidates) / count - 0.5
    return candidates[np.floor(positions + 0.5).astype(int)]


def _check_arguments(n_subjects, seed, grids, slices_per_subject, val_fraction, test_fraction, channels):
    """Raise ValueError naming the first bad argument; return the grid names and channels as tuples."""
    grids = check_dataset_arguments(
        n_subjects, seed, grids, list(GRIDS), val_fraction, test_fraction, slices_per_subject=slices_per_subject
    )
    channels = tuple(channels)
    for name in channels:
        if name not in BRAIN_CHANNELS:
            raise ValueError(f"unknown channel {name!r} in channels; choose from {list(BRAIN_CHANNELS)}.")
    if len(set(channels)) != len(channels):
        raise ValueError(f"channels must not repeat a name, got {list(channels)}.")
    missing = [name for name in TISSUE_CHANNELS if name not in channels]
    if missing:
        raise ValueError(f"channels must include every tissue channel {list(TISSUE_CHANNELS)}; missing {missing}.")
    return grids, channels


def make_brain_dataset(
    out_dir: str | Path,
    n_subjects: int = 40,
    seed: int = 0,
    grids: Sequence[str] = ("demo",),
    slices_per_subject: int = 12,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    channels: Sequence[str] = DEFAULT_CHANNELS,
) -> dict[str, Path]:
    """Write synthetic brain subjects (3D volumes and 2D axial slices) and their MONAI datalists.

    Parameters
    ----------
    out_dir : str or Path
        Output root; each grid gets ``out_dir/<grid>/`` with ``3d/``, ``2d/``, ``datalist_3d.json`` and
        ``datalist_2d.json``.
    n_subjects : int
        Number of subjects, >= 1. Subject i depends only on (seed, i).
    seed : int
        Dataset seed, >= 0.
    grids : sequence of str
        Names from ``GRIDS``: "1mm" (160 x 176 x 112 voxels of 1 mm), "2mm" (96 x 128 x 96 of 2 mm),
        "demo" (56 x 72 x 64 of 3 mm).
    slices_per_subject : int
        Axial slices written per subject, >= 1, evenly spaced over the planes with at least half the largest brain area.
    val_fraction, test_fraction : float
        Fractions of subjects in the validation and test splits, each in [0, 1), together < 1.
    channels : sequence of str
        Label channels in file order; must contain the tissue channels (background, csf, gm, wm); lesion channels
        left out are not simulated.

    Returns
    -------
    dict of str to Path
        Datalist path per "<grid>/3d" and "<grid>/2d".

    Raises
    ------
    ValueError
        An argument is out of range or names an unknown grid or channel; the message names the argument.
    """
    grid_names, channels = _check_arguments(
        n_subjects, seed, grids, slices_per_subject, val_fraction, test_fraction, channels
    )
    template = _load_template()
    splits = split_names(n_subjects, val_fraction, test_fraction)
    digits = max(3, len(str(n_subjects - 1)))
    datalists = {}
    for grid_name in grid_names:
        grid = GRIDS[grid_name]
        grid_dir = Path(out_dir) / grid_name
        for folder in ("3d", "2d"):
            (grid_dir / folder).mkdir(parents=True, exist_ok=True)
        affine = _grid_affine(grid, template.brain_centre_mm)
        voxel_volume_mm3 = grid.spacing_mm**3
        entries = {"3d": {split: [] for split in SPLITS}, "2d": {split: [] for split in SPLITS}}
        for index, split in enumerate(splits):
            rng = np.random.default_rng([seed, index])
            subject = _sample_subject(rng, template)
            label, images = _render_subject(subject, template, grid, affine, channels, rng)
            name = f"sub-{index:0{digits}d}"
            entry = _write_case(grid_dir, f"3d/{name}", label, images, affine, channels, voxel_volume_mm3)
            entries["3d"][split].append({"subject": name, **entry})
            brain = 1.0 - label[..., channels.index("background")]
            for z in axial_brain_planes(brain, slices_per_subject):
                slice_affine = affine.copy()
                slice_affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, z]) + affine[:3, 3]
                entry = _write_case(
                    grid_dir, f"2d/{name}_z{z:03d}", label[:, :, z : z + 1],
                    {key: image[:, :, z : z + 1] for key, image in images.items()}, slice_affine, channels,
                    voxel_volume_mm3,
                )  # fmt: skip
                entries["2d"][split].append({"subject": name, **entry, "slice_index": int(z)})
        for dimension, shape in (("3d", list(grid.shape)), ("2d", [*grid.shape[:2], 1])):
            path = grid_dir / f"datalist_{dimension}.json"
            content = {
                **entries[dimension],
                "channels": list(channels),
                "lesion_channels": [name for name in LESION_CHANNELS if name in channels],
                "spacing_mm": [grid.spacing_mm] * 3,
                "shape": shape,
                "seed": seed,
                "description": (
                    f"Synthetic brain MRI ({dimension.upper()}, grid '{grid_name}') warped from nilearn's MNI152 2009 "
                    "template, with WMH and tumour lesions (medgen_common.demo_data.brain). Labels are soft maps with "
                    "channels last (X x Y x Z x C); T1 is the warped template, T2 and FLAIR are simulated."
                ),
            }
            write_json(content, path)
            datalists[f"{grid_name}/{dimension}"] = path
    return datalists
