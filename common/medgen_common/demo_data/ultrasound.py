"""Synthetic shoulder (MSK) B-mode ultrasound with 8-class label maps, and the speckle simulator that draws it.

Speckle simulator (public; the elastography demo data calls it with its own echogenicity maps)
    Arrays are (H, W): rows are depth (row 0 touches the probe), columns are lateral, pixels square, ``pixel_mm``
    wide. ``backscatter`` is the mean backscattered power, linear, 1 = bone cortex (0 dB). ``simulate_bmode`` chains:
    1. ``transmission``: two-way power transmission exp10(-cumulative attenuation / 10) down each column, so strong
       attenuators (bone, calcification) cast an acoustic shadow and weak ones (fluid) a posterior enhancement;
    2. ``scatterer_field``: a Poisson number of scatterers per pixel (``scatterer_density_per_mm2``) with circular
       complex Gaussian amplitudes scaled to the attenuated backscatter; few scatterers per resolution cell give
       spotty, non-Rayleigh speckle; plus complex thermal noise of power ``noise_db``;
    3. ``apply_psf``: a separable unit-energy Gaussian PSF (axial and lateral sigma in mm);
    4. envelope power |.|^2, times the time-gain compensation exp10(tgc_db_per_mm * depth / 10), block-averaged
       ``supersample`` x ``supersample``;
    5. ``log_compress``: 1 + (10 log10(power) + gain_db) / dynamic_range_db, clipped to [0, 1];
    6. display: lateral Gaussian blur (``display_blur_mm``) and quantisation to ``grey_levels`` levels.

Devices (``DEVICES``; the style a context image carries)
    Four parameter sets from a fine high-frequency linear probe to a coarse, noisy, 32-level pocket device: they
    differ in speckle size (PSF), speckle statistics (scatterer density), contrast (dynamic range), brightness
    (gain), depth trend (TGC against the ~1 dB/mm of soft tissue), noise floor, smoothing and grey levels. Every
    subject (a clip) is scanned by device ``index % devices``, with its parameters jittered by about 5 % (gain by
    1 dB), as the csg spec's clips of one device differ slightly.

Anatomy (long axis of the supraspinatus over the humeral head; ``FIELD_OF_VIEW_MM`` square, u lateral from the
centre, v depth from the skin, in mm)
    subcutis (background) of 1.5-3.5 mm; deltoid muscle of 3.5-8 mm; a bright peribursal fat line of 0.4-0.8 mm
    (background); the tendon, 4-6.5 mm thick at the apex and wedge-shaped (+-25 % per 10 mm); the bone surface
    v = apex + c (u - u0)^2 (c 0.006-0.02 / mm, u0 within +-6 mm), a cortex of 0.8-1.2 mm and, below it, the
    shadowed medulla (background). Without bone (26 % of subjects) the tendon lies on deep muscle.
    Findings, inside their host: DITF, an ellipse in the tendon's own coordinates (along it, height above the
    bone), semi-axes 1.5-3.5 mm by 25-45 % of the thickness; calcification, an ellipse of 0.5-1.1 mm radius, 1-2
    times longer along the tendon; bone irregularity, 3 Gaussian bumps (spurs or erosions of 0.3-0.9 mm, sigma
    0.4-1.2 mm, within 2-4.5 mm of a point) that the tendon floor follows, labelling the cortex they span (+-2.5
    sigma); anisotropy, a vertical band 2.5-6 mm wide through the tendon.
    Presence follows Table 1 of the paper (``PREVALENCE``, fractions of subjects); subjects 0-3 always carry DITF,
    calcification, bone irregularity and anisotropy respectively, so 4 subjects hold every class.

Echotexture rules (``TISSUES``: mean power in dB re cortex, texture amplitude in dB, two-way attenuation in dB/mm)
    tendon -16 dB with fibrillar texture: unit noise correlated 2.8 mm along the tendon and 0.2 mm across, +-5 dB;
    muscle -37 dB (hypoechoic) plus bright oblique striations: 10 dB x the positive part of noise correlated 3 mm
        along the pennation angle (8-25 deg) and 0.25 mm across;
    bone cortex 0 dB, 12 dB/mm; medulla -20 dB, 20 dB/mm: the shadow under the bone;
    DITF -45 dB (fluid), 0.1 dB/mm: posterior enhancement; calcification +4 dB, 20 dB/mm: shadow;
    bone irregularity -6 dB with +-6 dB fragmented texture; anisotropy -30 dB with faint (+-2 dB) fibres;
    subcutis -40 dB +-5 dB isotropic texture (0.5 mm); peribursal fat -14 dB.

Frames
    Each subject gives ``frames_per_subject`` frames: the probe drifts laterally (0.4 mm + a 0.25 mm random walk),
    tilts by ~0.6 deg and compresses the tissue by ~1 %; textures move with the anatomy, speckle is redrawn.

Files (``OUT/<grid>/``)
    ``2d/sub-XXX_fNN_image.nii.gz`` (H x W x 1 float32 in [0, 1]) and ``2d/sub-XXX_fNN_label.nii.gz`` (H x W x 1
    uint8 class indices, ``CLASS_NAMES``); ``datalist_2d.json`` with splits "training", "validation", "test" (by
    subject), entries {image, label, subject, device, frame} and top-level ``class_names`` and ``device_names``.

Determinism
    Subject i's anatomy comes from ``numpy.random.default_rng([seed, i])``, its device jitter and probe poses from
    ``[seed, i, 1]`` and frame f's speckle from ``[seed, i, 2, f]``: ``n_subjects=10`` gives the first 10 subjects of
    ``n_subjects=40``, and files are byte-identical between runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..writers import save_nifti, write_json
from .splits import check_dataset_arguments, split_names

__all__ = [
    "CLASS_NAMES",
    "FINDINGS",
    "PREVALENCE",
    "TISSUES",
    "DEVICES",
    "GRIDS",
    "FIELD_OF_VIEW_MM",
    "Tissue",
    "UltrasoundDevice",
    "Grid",
    "ProbePose",
    "MskSubject",
    "smooth_random_field",
    "transmission",
    "scatterer_field",
    "apply_psf",
    "log_compress",
    "simulate_bmode",
    "sample_msk_subject",
    "render_msk_frame",
    "make_msk_dataset",
]

# class order of the csg spec (section 8.1); the paper names the classes, not their indices
CLASS_NAMES = (
    "background", "bone", "tendon", "muscle", "ditf", "calcification", "bone_irregularity", "anisotropy",
)  # fmt: skip
BACKGROUND, BONE, TENDON, MUSCLE, DITF, CALCIFICATION, BONE_IRREGULARITY, ANISOTROPY = range(len(CLASS_NAMES))
FINDINGS = ("ditf", "calcification", "bone_irregularity", "anisotropy")
# fraction of subjects holding each structure: Table 1's share of 512 x 512 patches containing the class
PREVALENCE = {"bone": 0.74, "ditf": 0.46, "calcification": 0.11, "bone_irregularity": 0.31, "anisotropy": 0.31}
FIELD_OF_VIEW_MM = 25.6  # depth and width of every grid
SPLITS = ("training", "validation", "test")
_GZIP_LEVEL = 1


@dataclass(frozen=True)
class Tissue:
    """Echo rule of one tissue: its class, mean backscattered power (dB re bone cortex), texture kind
    ("isotropic", "fibrillar" or "striated") and amplitude (dB), and two-way attenuation (dB/mm)."""

    label: int
    level_db: float
    texture: str
    texture_db: float
    attenuation_db_per_mm: float


TISSUES = {
    "subcutis": Tissue(BACKGROUND, -40.0, "isotropic", 5.0, 0.7),
    "bursa": Tissue(BACKGROUND, -14.0, "isotropic", 2.0, 0.7),  # peribursal fat line over the tendon
    "muscle": Tissue(MUSCLE, -37.0, "striated", 10.0, 0.9),
    "tendon": Tissue(TENDON, -16.0, "fibrillar", 5.0, 1.2),
    "bone": Tissue(BONE, 0.0, "isotropic", 2.0, 12.0),
    "medulla": Tissue(BACKGROUND, -20.0, "isotropic", 3.0, 20.0),  # under the cortex: shadowed
    "ditf": Tissue(DITF, -45.0, "isotropic", 3.0, 0.1),
    "calcification": Tissue(CALCIFICATION, 4.0, "isotropic", 2.0, 20.0),
    "bone_irregularity": Tissue(BONE_IRREGULARITY, -6.0, "isotropic", 6.0, 12.0),
    "anisotropy": Tissue(ANISOTROPY, -30.0, "fibrillar", 2.0, 1.2),
}
_T = {name: index for index, name in enumerate(TISSUES)}
_TEXTURE_KINDS = ("isotropic", "fibrillar", "striated")
_TISSUE_LABEL = np.array([tissue.label for tissue in TISSUES.values()], dtype=np.uint8)
_TISSUE_LEVEL_DB = np.array([tissue.level_db for tissue in TISSUES.values()])
_TISSUE_TEXTURE_DB = np.array([tissue.texture_db for tissue in TISSUES.values()])
_TISSUE_TEXTURE_KIND = np.array([_TEXTURE_KINDS.index(tissue.texture) for tissue in TISSUES.values()])
_TISSUE_ATTENUATION = np.array([tissue.attenuation_db_per_mm for tissue in TISSUES.values()])


@dataclass(frozen=True)
class UltrasoundDevice:
    """Acquisition and display parameters of one scanner (see the module docstring for where each enters).

    PSF sigmas and blur in mm; ``scatterer_density_per_mm2`` in scatterers / mm^2; ``gain_db``,
    ``dynamic_range_db`` in dB; ``tgc_db_per_mm`` two-way, in dB/mm of depth; ``noise_db`` thermal noise power in
    dB re bone cortex before time-gain compensation; ``grey_levels`` displayed levels (>= 2).
    """

    name: str
    axial_psf_mm: float
    lateral_psf_mm: float
    scatterer_density_per_mm2: float
    gain_db: float
    dynamic_range_db: float
    tgc_db_per_mm: float
    noise_db: float
    display_blur_mm: float
    grey_levels: int

    def __post_init__(self):
        positive = ("axial_psf_mm", "lateral_psf_mm", "scatterer_density_per_mm2", "dynamic_range_db")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        if not self.display_blur_mm >= 0:
            raise ValueError(f"display_blur_mm must be >= 0, got {self.display_blur_mm!r}.")
        if not self.grey_levels >= 2:
            raise ValueError(f"grey_levels must be >= 2, got {self.grey_levels!r}.")


DEVICES = (
    UltrasoundDevice("site_a_high_frequency", 0.10, 0.22, 60.0, 1.0, 60.0, 0.95, -80.0, 0.0, 256),
    UltrasoundDevice("site_b_standard", 0.18, 0.40, 25.0, -3.0, 50.0, 0.75, -70.0, 0.0, 256),
    UltrasoundDevice("site_c_smoothed", 0.30, 0.65, 12.0, 4.0, 44.0, 1.10, -72.0, 0.35, 128),
    UltrasoundDevice("site_d_pocket", 0.45, 1.05, 5.0, 0.0, 36.0, 0.70, -50.0, 0.0, 32),
)


@dataclass(frozen=True)
class Grid:
    """Output grid of ``shape`` (rows depth, columns lateral) pixels ``pixel_mm`` wide; speckle is simulated on a
    grid ``supersample`` times finer and block-averaged."""

    shape: tuple[int, int]
    pixel_mm: float
    supersample: int


GRIDS = {
    "demo": Grid((64, 64), 0.4, 2),
    "full": Grid((512, 512), 0.05, 1),  # the paper's 512 x 512 patches (Table 1)
}


@dataclass(frozen=True)
class ProbePose:
    """Probe position of one frame: lateral shift (mm), tilt about the centre of the probe face (rad), and depth
    scale (tissue compression, 1 = none)."""

    lateral_shift_mm: float = 0.0
    tilt_rad: float = 0.0
    depth_scale: float = 1.0


@dataclass(frozen=True)
class _Lattice:
    """Smooth unit-variance noise on a lattice: ``values[i, j]`` lies at (a0 + i da, b0 + j db) mm."""

    values: np.ndarray
    origin_mm: tuple[float, float]
    spacing_mm: tuple[float, float]


@dataclass(frozen=True)
class _Ellipse:
    """An ellipse in tendon coordinates: along the tendon (u, mm) and height above the bone surface (d, mm)."""

    centre_u_mm: float
    centre_d_mm: float
    semi_u_mm: float
    semi_d_mm: float


@dataclass(frozen=True)
class _Irregularity:
    """Gaussian bumps (positive height = erosion, deeper) on the cortex; the irregular cortex spans the bumps
    +-2.5 sigma."""

    bump_positions_mm: np.ndarray  # (K,) lateral
    bump_heights_mm: np.ndarray  # (K,)
    bump_widths_mm: np.ndarray  # (K,)


@dataclass(frozen=True)
class MskSubject:
    """Random anatomy of one subject (lengths in mm, u lateral from the centre, v depth); a function of (seed,
    index) only. Absent findings are None."""

    subcutis_mm: float
    subcutis_slope: float  # depth change per mm lateral
    muscle_mm: float
    bursa_mm: float
    tendon_mm: float  # at the bone apex
    tendon_wedge: float  # relative thickness change per 10 mm lateral
    bone_apex_u_mm: float
    bone_curvature_per_mm: float
    cortex_mm: float
    has_bone: bool
    pennation_rad: float
    ditf: _Ellipse | None
    calcification: _Ellipse | None
    bone_irregularity: _Irregularity | None
    anisotropy_band_mm: tuple[float, float] | None  # (centre, half width)
    isotropic_texture: _Lattice  # over (v, u)
    fibre_texture: _Lattice  # over (d, u)
    muscle_texture: _Lattice  # over (across, along) the pennation direction

    @property
    def bone_apex_mm(self) -> float:
        """Depth of the shallowest point of the bone surface."""
        return self.subcutis_mm + self.muscle_mm + self.bursa_mm + self.tendon_mm


# ----------------------------------------------------------------------------------------------- speckle simulator


def smooth_random_field(rng: np.random.Generator, shape: Sequence[int], sigma: float | Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field of ``shape``, white noise smoothed by a Gaussian of ``sigma``
    pixels per axis (periodic boundary). Returns float64 ``shape``."""
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="wrap")
    field -= field.mean()
    return field / field.std()


def transmission(attenuation_db_per_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Two-way power transmission from the probe (row 0) to the middle of each pixel.

    attenuation_db_per_mm: (H, W) two-way attenuation coefficient, dB/mm. Returns (H, W) in (0, 1].
    """
    attenuation = np.asarray(attenuation_db_per_mm, dtype=np.float64)
    path_db = (np.cumsum(attenuation, axis=0) - 0.5 * attenuation) * pixel_mm
    return 10.0 ** (-path_db / 10.0)


def scatterer_field(
    power: np.ndarray, pixel_mm: float, density_per_mm2: float, rng: np.random.Generator
) -> np.ndarray:
    """Complex scatterer amplitudes with mean power ``power`` (H, W, linear): a Poisson number of scatterers per
    pixel (mean ``density_per_mm2`` x pixel area), each with a circular complex Gaussian amplitude. Returns
    complex128 (H, W)."""
    expected = density_per_mm2 * pixel_mm**2
    counts = rng.poisson(expected, size=power.shape)
    amplitude = np.sqrt(power * counts / (2.0 * expected))
    return amplitude * (rng.standard_normal(power.shape) + 1j * rng.standard_normal(power.shape))


def _gaussian_kernel_energy(sigma: float) -> float:
    """Sum of squares of scipy's 1D Gaussian kernel of ``sigma`` pixels (truncated at 4 sigma)."""
    radius = int(4.0 * sigma + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    return float((ndimage.gaussian_filter1d(impulse, sigma, mode="constant") ** 2).sum())


def apply_psf(field: np.ndarray, pixel_mm: float, axial_psf_mm: float, lateral_psf_mm: float) -> np.ndarray:
    """Convolve a complex field (H, W) with a separable Gaussian PSF of sigmas ``axial_psf_mm`` (rows) and
    ``lateral_psf_mm`` (columns), normalised to unit energy so white scatterers keep their mean power."""
    sigma = (axial_psf_mm / pixel_mm, lateral_psf_mm / pixel_mm)
    blurred = ndimage.gaussian_filter(field.real, sigma) + 1j * ndimage.gaussian_filter(field.imag, sigma)
    return blurred / math.sqrt(_gaussian_kernel_energy(sigma[0]) * _gaussian_kernel_energy(sigma[1]))


def log_compress(intensity: np.ndarray, dynamic_range_db: float, gain_db: float = 0.0) -> np.ndarray:
    """Grey level 1 + (10 log10(intensity) + gain_db) / dynamic_range_db, clipped to [0, 1].

    intensity: echo power, linear (1 = 0 dB). To display relative to the image's own 99.5th percentile (the
    elastography spec's rule) pass ``gain_db = -10 log10(percentile)``.
    """
    level_db = 10.0 * np.log10(np.maximum(intensity, 1e-30)) + gain_db
    return np.clip(1.0 + level_db / dynamic_range_db, 0.0, 1.0)


def simulate_bmode(
    backscatter: np.ndarray,
    attenuation_db_per_mm: np.ndarray | None,
    device: UltrasoundDevice,
    pixel_mm: float,
    rng: np.random.Generator,
    supersample: int = 1,
) -> np.ndarray:
    """B-mode image of a backscatter map as ``device`` shows it (steps 1-6 of the module docstring).

    Parameters
    ----------
    backscatter : (H, W) mean backscattered power, linear, 1 = bone cortex; rows are depth from the probe.
    attenuation_db_per_mm : (H, W) two-way attenuation in dB/mm, or None for none.
    device : the scanner's PSF, speckle, gain, TGC, noise and display parameters.
    pixel_mm : pixel size of ``backscatter`` in mm.
    rng : source of the scatterers and noise.
    supersample : output pixels are ``supersample`` x ``supersample`` blocks; must divide H and W.

    Returns
    -------
    (H / supersample, W / supersample) float32 grey levels in [0, 1].
    """
    backscatter = np.asarray(backscatter, dtype=np.float64)
    if backscatter.ndim != 2:
        raise ValueError(f"backscatter must be a 2D (H, W) map, got shape {backscatter.shape}.")
    if attenuation_db_per_mm is not None and np.shape(attenuation_db_per_mm) != backscatter.shape:
        raise ValueError(
            f"attenuation_db_per_mm must have the shape of backscatter {backscatter.shape}, "
            f"got {np.shape(attenuation_db_per_mm)}."
        )
    if not pixel_mm > 0:
        raise ValueError(f"pixel_mm must be > 0, got {pixel_mm!r}.")
    is_count = isinstance(supersample, (int, np.integer)) and supersample >= 1
    if not is_count or any(n % supersample for n in backscatter.shape):
        raise ValueError(f"supersample must be an integer >= 1 dividing {backscatter.shape}, got {supersample!r}.")
    height, width = backscatter.shape
    power = backscatter
    if attenuation_db_per_mm is not None:
        power = backscatter * transmission(attenuation_db_per_mm, pixel_mm)
    field = scatterer_field(power, pixel_mm, device.scatterer_density_per_mm2, rng)
    noise_sigma = math.sqrt(10.0 ** (device.noise_db / 10.0) / 2.0)
    field += noise_sigma * (rng.standard_normal(field.shape) + 1j * rng.standard_normal(field.shape))
    echo = apply_psf(field, pixel_mm, device.axial_psf_mm, device.lateral_psf_mm)
    depth_mm = (np.arange(height) + 0.5) * pixel_mm
    intensity = np.abs(echo) ** 2 * 10.0 ** (device.tgc_db_per_mm * depth_mm[:, None] / 10.0)
    intensity = intensity.reshape(height // supersample, supersample, width // supersample, supersample).mean((1, 3))
    image = log_compress(intensity, device.dynamic_range_db, device.gain_db)
    if device.display_blur_mm > 0:
        image = ndimage.gaussian_filter1d(image, device.display_blur_mm / (pixel_mm * supersample), axis=1)
    levels = device.grey_levels - 1
    return (np.round(image * levels) / levels).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- anatomy


def _lattice(rng, lower_mm, upper_mm, spacing_mm, sigma_mm) -> _Lattice:
    """Smooth noise covering the box [lower, upper] (mm, two axes) with the given node spacing and correlation."""
    shape = [int(math.ceil((hi - lo) / step)) + 1 for lo, hi, step in zip(lower_mm, upper_mm, spacing_mm)]
    sigma = [s / step for s, step in zip(sigma_mm, spacing_mm)]
    return _Lattice(smooth_random_field(rng, shape, sigma), tuple(lower_mm), tuple(spacing_mm))


def _sample(lattice: _Lattice, a_mm: np.ndarray, b_mm: np.ndarray) -> np.ndarray:
    """Bilinear sample of a lattice at points (a, b) in mm (any equal shapes); mirrored outside the box."""
    (a0, b0), (da, db) = lattice.origin_mm, lattice.spacing_mm
    coordinates = [(a_mm - a0) / da, (b_mm - b0) / db]
    return ndimage.map_coordinates(lattice.values, coordinates, order=1, mode="mirror")


def _check_prevalence(finding_prevalence: Mapping[str, float] | None) -> dict[str, float]:
    """``PREVALENCE`` updated by ``finding_prevalence``; raise ValueError on unknown names or bad values."""
    prevalence = dict(PREVALENCE)
    for name, value in (finding_prevalence or {}).items():
        if name not in PREVALENCE:
            raise ValueError(f"unknown name {name!r} in finding_prevalence; choose from {list(PREVALENCE)}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"finding_prevalence[{name!r}] must be a number in [0, 1], got {value!r}.")
        prevalence[name] = float(value)
    if prevalence["bone_irregularity"] > prevalence["bone"]:
        raise ValueError(
            f"finding_prevalence: bone_irregularity ({prevalence['bone_irregularity']}) needs bone, so it must not "
            f"exceed bone ({prevalence['bone']})."
        )
    return prevalence


def sample_msk_subject(seed: int, index: int, finding_prevalence: Mapping[str, float] | None = None) -> MskSubject:
    """Anatomy of subject ``index`` of the dataset with ``seed`` (rules in the module docstring).

    ``finding_prevalence`` overrides fractions of ``PREVALENCE`` (names bone, ditf, calcification,
    bone_irregularity, anisotropy). Subjects 0-3 carry the findings of ``FINDINGS`` in order unless their
    prevalence is 0. Every draw is made whatever is present, so prevalences change presence only.
    """
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    prevalence = _check_prevalence(finding_prevalence)
    rng = np.random.default_rng([seed, index])
    draws = dict(zip(PREVALENCE, rng.random(len(PREVALENCE))))
    present = {name: draws[name] < prevalence[name] for name in ("bone", "ditf", "calcification", "anisotropy")}
    irregular_given_bone = prevalence["bone_irregularity"] / prevalence["bone"] if prevalence["bone"] > 0 else 0.0
    present["bone_irregularity"] = present["bone"] and draws["bone_irregularity"] < irregular_given_bone
    if index < len(FINDINGS) and prevalence[FINDINGS[index]] > 0:
        present[FINDINGS[index]] = True
        present["bone"] |= FINDINGS[index] == "bone_irregularity"

    subcutis, slope, muscle = rng.uniform(1.5, 3.5), rng.uniform(-0.05, 0.05), rng.uniform(3.5, 8.0)
    bursa, tendon, wedge = rng.uniform(0.4, 0.8), rng.uniform(4.0, 6.5), rng.uniform(-0.25, 0.25)
    apex_u, curvature, cortex = rng.uniform(-6.0, 6.0), rng.uniform(0.006, 0.02), rng.uniform(0.8, 1.2)
    pennation = rng.choice([-1.0, 1.0]) * math.radians(rng.uniform(8.0, 25.0))

    def thickness(u):
        return max(2.0, tendon * (1.0 + wedge * (u - apex_u) / 10.0))

    ditf_u = rng.uniform(-7.0, 7.0)
    ditf_height, ditf_semi_u = rng.uniform(0.25, 0.75), rng.uniform(1.5, 3.5)
    ditf = _Ellipse(ditf_u, ditf_height * thickness(ditf_u), ditf_semi_u, rng.uniform(0.25, 0.45) * thickness(ditf_u))
    calcification_u, radius = rng.uniform(-8.0, 8.0), rng.uniform(0.5, 1.1)
    calcification = _Ellipse(
        calcification_u, rng.uniform(0.3, 0.7) * thickness(calcification_u), radius * rng.uniform(1.0, 2.0), radius
    )
    irregularity = _Irregularity(
        rng.uniform(-8.0, 8.0) + rng.uniform(-1.0, 1.0, 3) * rng.uniform(2.0, 4.5),
        rng.choice([-1.0, 1.0], 3) * rng.uniform(0.3, 0.9, 3), rng.uniform(0.4, 1.2, 3),
    )
    anisotropy = (rng.uniform(-9.0, 9.0), rng.uniform(1.25, 3.0))
    # texture lattices cover the field of view, probe motion and rotated frames with a margin
    half_fov, depth = FIELD_OF_VIEW_MM / 2.0, FIELD_OF_VIEW_MM
    return MskSubject(
        subcutis_mm=subcutis, subcutis_slope=slope, muscle_mm=muscle, bursa_mm=bursa, tendon_mm=tendon,
        tendon_wedge=wedge, bone_apex_u_mm=apex_u, bone_curvature_per_mm=curvature, cortex_mm=cortex,
        has_bone=bool(present["bone"]), pennation_rad=pennation,
        ditf=ditf if present["ditf"] else None,
        calcification=calcification if present["calcification"] else None,
        bone_irregularity=irregularity if present["bone_irregularity"] else None,
        anisotropy_band_mm=anisotropy if present["anisotropy"] else None,
        isotropic_texture=_lattice(rng, (-4.0, -half_fov - 8), (depth + 4, half_fov + 8), (0.25, 0.25), (0.5, 0.5)),
        fibre_texture=_lattice(rng, (-3.0, -half_fov - 8), (12.0, half_fov + 8), (0.08, 0.4), (0.2, 2.8)),
        muscle_texture=_lattice(rng, (-half_fov - 14,) * 2, (half_fov + 14,) * 2, (0.1, 0.5), (0.25, 3.0)),
    )  # fmt: skip


def _pose_coordinates(shape: tuple[int, int], pixel_mm: float, pose: ProbePose) -> tuple[np.ndarray, np.ndarray]:
    """Subject coordinates (v depth, u lateral; mm) of the pixel centres of a frame, each (H, W)."""
    y = (np.arange(shape[0]) + 0.5)[:, None] * pixel_mm
    x = (np.arange(shape[1]) + 0.5)[None, :] * pixel_mm - FIELD_OF_VIEW_MM / 2.0
    cos, sin = math.cos(pose.tilt_rad), math.sin(pose.tilt_rad)
    u = cos * x + sin * y + pose.lateral_shift_mm
    v = (cos * y - sin * x) * pose.depth_scale
    return v, u


def _tissue_map(subject: MskSubject, v: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue index (into ``TISSUES``) at points (v, u) and their height d above the smooth bone surface (mm)."""
    bone_surface = subject.bone_apex_mm + subject.bone_curvature_per_mm * (u - subject.bone_apex_u_mm) ** 2
    thickness = np.maximum(2.0, subject.tendon_mm * (1.0 + subject.tendon_wedge * (u - subject.bone_apex_u_mm) / 10.0))
    tendon_top = bone_surface - thickness
    cortex_top = bone_surface
    irregularity = subject.bone_irregularity
    if irregularity is not None:
        positions, widths = irregularity.bump_positions_mm, irregularity.bump_widths_mm
        bumps = irregularity.bump_heights_mm * np.exp(-0.5 * ((u[..., None] - positions) / widths) ** 2)
        cortex_top = bone_surface + bumps.sum(-1)
        in_segment = (u > (positions - 2.5 * widths).min()) & (u < (positions + 2.5 * widths).max())
    d = bone_surface - v

    tissue = np.full(np.broadcast_shapes(v.shape, u.shape), _T["subcutis"], dtype=np.int8)
    tissue[v >= subject.subcutis_mm + subject.subcutis_slope * u] = _T["muscle"]
    tissue[v >= tendon_top - subject.bursa_mm] = _T["bursa"]
    tissue[v >= tendon_top] = _T["tendon"]
    if subject.has_bone:
        tissue[v >= cortex_top] = _T["bone"]
        tissue[v >= cortex_top + subject.cortex_mm] = _T["medulla"]
        if irregularity is not None:
            tissue[(tissue == _T["bone"]) & in_segment] = _T["bone_irregularity"]
    else:
        tissue[v >= bone_surface] = _T["muscle"]  # the tendon lies on deep muscle

    in_tendon = tissue == _T["tendon"]
    if subject.anisotropy_band_mm is not None:
        centre, half_width = subject.anisotropy_band_mm
        tissue[in_tendon & (np.abs(u - centre) < half_width)] = _T["anisotropy"]
    for name in ("ditf", "calcification"):  # later findings win where they overlap
        ellipse = getattr(subject, name)
        if ellipse is not None:
            along, across = (u - ellipse.centre_u_mm) / ellipse.semi_u_mm, (d - ellipse.centre_d_mm) / ellipse.semi_d_mm
            inside = along**2 + across**2 < 1.0
            tissue[in_tendon & inside] = _T[name]
    return tissue, d


def _echo_maps(
    subject: MskSubject, tissue: np.ndarray, v: np.ndarray, u: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Backscatter (linear power) and two-way attenuation (dB/mm) of a tissue map, textures included."""
    along = u * math.cos(subject.pennation_rad) + v * math.sin(subject.pennation_rad)
    across = v * math.cos(subject.pennation_rad) - u * math.sin(subject.pennation_rad)
    textures = np.stack([
        _sample(subject.isotropic_texture, v, u),
        _sample(subject.fibre_texture, d, u),
        np.maximum(_sample(subject.muscle_texture, across, along), 0.0),  # bright septa only
    ])  # fmt: skip
    texture = np.take_along_axis(textures, _TISSUE_TEXTURE_KIND[tissue][None], axis=0)[0]
    level_db = _TISSUE_LEVEL_DB[tissue] + _TISSUE_TEXTURE_DB[tissue] * texture
    return 10.0 ** (level_db / 10.0), _TISSUE_ATTENUATION[tissue]


def render_msk_frame(
    subject: MskSubject, device: UltrasoundDevice, grid: Grid, pose: ProbePose, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One B-mode frame of ``subject`` seen by ``device`` from ``pose``.

    Returns (image, label): (H, W) float32 grey levels in [0, 1] and (H, W) uint8 class indices (``CLASS_NAMES``),
    with H, W = ``grid.shape``.
    """
    fine_shape = (grid.shape[0] * grid.supersample, grid.shape[1] * grid.supersample)
    fine_pixel_mm = grid.pixel_mm / grid.supersample
    v, u = _pose_coordinates(fine_shape, fine_pixel_mm, pose)
    tissue, d = _tissue_map(subject, v, u)
    backscatter, attenuation = _echo_maps(subject, tissue, v, u, d)
    image = simulate_bmode(backscatter, attenuation, device, fine_pixel_mm, rng, grid.supersample)
    if grid.supersample > 1:  # labels at the output pixel centres
        tissue = _tissue_map(subject, *_pose_coordinates(grid.shape, grid.pixel_mm, pose))[0]
    return image, _TISSUE_LABEL[tissue]


# ----------------------------------------------------------------------------------------------------- dataset


def _clip_device(device: UltrasoundDevice, rng: np.random.Generator) -> UltrasoundDevice:
    """The device as one clip saw it: sizes, density, dynamic range and TGC x exp(N(0, 5 %)), gain and noise
    shifted by N(0, 1 dB) and N(0, 1.5 dB)."""
    factors = np.exp(rng.normal(0.0, 0.05, 5))
    return replace(
        device,
        axial_psf_mm=device.axial_psf_mm * factors[0],
        lateral_psf_mm=device.lateral_psf_mm * factors[1],
        scatterer_density_per_mm2=device.scatterer_density_per_mm2 * factors[2],
        dynamic_range_db=device.dynamic_range_db * factors[3],
        tgc_db_per_mm=device.tgc_db_per_mm * factors[4],
        gain_db=device.gain_db + rng.normal(0.0, 1.0),
        noise_db=device.noise_db + rng.normal(0.0, 1.5),
    )


def _probe_poses(rng: np.random.Generator, count: int) -> list[ProbePose]:
    """Poses of a clip: lateral drift N(0, 0.4 mm) plus a random walk of 0.25 mm steps, tilt N(0, 0.01 rad), depth
    scale 1 + N(0, 0.01)."""
    shifts = rng.normal(0.0, 0.4) + np.cumsum(rng.normal(0.0, 0.25, count))
    tilts, scales = rng.normal(0.0, 0.01, count), 1.0 + rng.normal(0.0, 0.01, count)
    return [ProbePose(float(s), float(t), float(c)) for s, t, c in zip(shifts, tilts, scales)]


def _check_arguments(
    n_subjects, seed, grids, frames_per_subject, devices, val_fraction, test_fraction
) -> tuple[str, ...]:
    """Raise ValueError naming the first bad argument; return the grid names."""
    grids = check_dataset_arguments(
        n_subjects, seed, grids, list(GRIDS), val_fraction, test_fraction, frames_per_subject=frames_per_subject,
        devices=devices,
    )  # fmt: skip
    if devices > len(DEVICES):
        raise ValueError(f"devices must be at most {len(DEVICES)} (the number of DEVICES), got {devices!r}.")
    return grids


def make_msk_dataset(
    out_dir: str | Path,
    n_subjects: int = 48,
    seed: int = 0,
    grids: Sequence[str] = ("demo",),
    frames_per_subject: int = 8,
    devices: int = 4,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    finding_prevalence: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write synthetic shoulder B-mode frames with 8-class label maps and their MONAI datalist.

    Parameters
    ----------
    out_dir : str or Path
        Output root; each grid gets ``out_dir/<grid>/`` with ``2d/`` and ``datalist_2d.json``.
    n_subjects : int
        Number of subjects (clips), >= 1. Subject i depends only on (seed, i).
    seed : int
        Dataset seed, >= 0.
    grids : sequence of str
        Names from ``GRIDS``: "demo" (64 x 64 pixels of 0.4 mm), "full" (512 x 512 of 0.05 mm); both cover
        ``FIELD_OF_VIEW_MM``.
    frames_per_subject : int
        Frames per subject, >= 1, each with a slightly moved probe.
    devices : int
        Number of devices used, 1 to ``len(DEVICES)``; subject i is scanned by ``DEVICES[i % devices]``.
    val_fraction, test_fraction : float
        Fractions of subjects in the validation and test splits, each in [0, 1), together < 1.
    finding_prevalence : mapping of str to float, optional
        Overrides of ``PREVALENCE`` (fraction of subjects with bone, ditf, calcification, bone_irregularity,
        anisotropy).

    Returns
    -------
    dict of str to Path
        Datalist path per "<grid>/2d".

    Raises
    ------
    ValueError
        An argument is out of range or names an unknown grid or finding; the message names the argument.
    """
    grid_names = _check_arguments(n_subjects, seed, grids, frames_per_subject, devices, val_fraction, test_fraction)
    _check_prevalence(finding_prevalence)
    splits = split_names(n_subjects, val_fraction, test_fraction)
    digits = max(3, len(str(n_subjects - 1)))
    grid_dirs = {name: Path(out_dir) / name for name in grid_names}
    for grid_dir in grid_dirs.values():
        (grid_dir / "2d").mkdir(parents=True, exist_ok=True)
    entries = {name: {split: [] for split in SPLITS} for name in grid_names}
    for index, split in enumerate(splits):
        subject = sample_msk_subject(seed, index, finding_prevalence)
        acquisition_rng = np.random.default_rng([seed, index, 1])
        device_index = index % devices
        device = _clip_device(DEVICES[device_index], acquisition_rng)
        poses = _probe_poses(acquisition_rng, frames_per_subject)
        name = f"sub-{index:0{digits}d}"
        for grid_name, grid_dir in grid_dirs.items():
            grid = GRIDS[grid_name]
            affine = np.diag([grid.pixel_mm] * 3 + [1.0])
            for frame, pose in enumerate(poses):
                speckle_rng = np.random.default_rng([seed, index, 2, frame])
                image, label = render_msk_frame(subject, device, grid, pose, speckle_rng)
                entry = {}
                for key, array in (("image", image), ("label", label)):
                    entry[key] = f"2d/{name}_f{frame:02d}_{key}.nii.gz"
                    save_nifti(array, grid_dir / entry[key], affine, channel_first=False, compresslevel=_GZIP_LEVEL)
                entries[grid_name][split].append({**entry, "subject": name, "device": device_index, "frame": frame})
    datalists = {}
    for grid_name, grid_dir in grid_dirs.items():
        grid = GRIDS[grid_name]
        content = {
            **entries[grid_name],
            "class_names": list(CLASS_NAMES),
            "device_names": [device.name for device in DEVICES[:devices]],
            "spacing_mm": [grid.pixel_mm] * 3,
            "shape": [*grid.shape, 1],
            "seed": seed,
            "description": (
                f"Synthetic shoulder MSK B-mode ultrasound (grid '{grid_name}'): simulated speckle over a procedural "
                "supraspinatus-over-humeral-head anatomy with DITF, calcification, bone irregularity and anisotropy "
                "findings, one simulated device per subject (medgen_common.demo_data.ultrasound). Images are float32 "
                "grey levels in [0, 1]; labels are uint8 class indices (class_names); rows are depth."
            ),
        }
        datalists[f"{grid_name}/2d"] = write_json(content, grid_dir / "datalist_2d.json")
    return datalists
