"""Accelerated-MRI reconstruction with a diffusion prior, measured against classical baselines on held-out slices
(the ``score_mri_recon`` bundle's inference and evaluation).

A protocol is a mask family, an acceleration and a fully sampled centre fraction; measurements are simulated from
fully sampled complex images (single-coil, or SENSE with ``num_coils`` synthetic coils), noiselessly. Every solver
uses the same prior, whatever the mask (no retraining). Scores are PSNR and SSIM of the magnitude (data range 1,
as the images have a peak magnitude of 1), the data residual ||A x - y|| / ||y|| and the network evaluations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage

from .compressed_sensing import l1_wavelet_reconstruction, tune_regularisation, tv_reconstruction, zero_filled
from .metrics import psnr, ssim
from .mri import (
    MultiCoilMRI, SingleCoilMRI, channels_to_complex, complex_to_channels, estimate_coil_maps, make_mask,
    sampling_fraction, synthetic_coil_maps,
)  # fmt: skip
from .posterior_sampling import DiffusionPrior, dds, dps, mcg, posterior_statistics, predictor_corrector
from .writers import save_nifti, save_png_grid, write_csv, write_json

__all__ = [
    "SOLVERS",
    "load_complex_images",
    "simulate_measurement",
    "magnitude_scores",
    "reconstruct",
    "reconstruct_to_files",
    "load_kspace",
    "reconstruct_kspace_files",
    "mri_report",
]

SOLVERS = {"dds": dds, "pc": predictor_corrector, "dps": dps, "mcg": mcg}
logger = logging.getLogger(__name__)


def load_complex_images(entries: Sequence[Mapping], key: str = "image") -> torch.Tensor:
    """Images ``[B, H, W]`` (complex64) from NIfTI files: complex ones with real and imaginary parts on the last axis
    (H x W (x 1) x 2), or magnitude ones (H x W (x 1), zero phase); each scaled to a peak magnitude of 1, the scale
    the prior is trained at and the data range of the PSNR/SSIM scores.

    Raises:
        ValueError: another layout, NaN/Inf values, an all-zero image, or images of different sizes (the file named).
    """
    images = []
    for entry in entries:
        array = np.asarray(LoadImage(image_only=True)(entry[key]), dtype=np.float32)
        squeezed = array.reshape([size for size in array.shape if size != 1])
        if not np.isfinite(array).all():
            raise ValueError(f"'{entry[key]}' holds NaN or Inf values.")
        if squeezed.ndim == 3 and squeezed.shape[-1] == 2:
            image = torch.complex(torch.from_numpy(squeezed[..., 0].copy()), torch.from_numpy(squeezed[..., 1].copy()))
        elif squeezed.ndim == 2:
            image = torch.from_numpy(squeezed.copy()).to(torch.complex64)
        else:
            raise ValueError(f"'{entry[key]}' must be a magnitude image (H x W) or complex (H x W x 2, real and "
                             f"imaginary last), got shape {array.shape}.")  # fmt: skip
        peak = float(image.abs().max())
        if peak == 0:
            raise ValueError(f"'{entry[key]}' is all zero.")
        if images and image.shape != images[0].shape:
            raise ValueError(f"'{entry[key]}' is {tuple(image.shape)}, the first image {tuple(images[0].shape)}: "
                             "reconstruct images of one size together.")  # fmt: skip
        images.append(image / peak)
    return torch.stack(images)


def simulate_measurement(images: torch.Tensor, protocol: Mapping, num_coils: int = 0, seed: int = 0):
    """Operator and noiseless k-space ``y = A x`` of ``images [B, H, W]`` under ``protocol`` (``mask_kind``,
    ``acceleration``, ``center_fraction``); ``num_coils`` 0 means single-coil."""
    mask = make_mask(protocol["mask_kind"], tuple(images.shape[-2:]), protocol["acceleration"],
                     protocol.get("center_fraction", 0.08), seed)  # fmt: skip
    operator = SingleCoilMRI(mask) if num_coils == 0 else MultiCoilMRI(mask, synthetic_coil_maps(tuple(images.shape[-2:]), num_coils))
    return operator, operator.A(images)


def magnitude_scores(estimates: torch.Tensor, truths: torch.Tensor) -> dict[str, list[float]]:
    """PSNR (dB) and SSIM of the magnitudes, per image, with data range 1."""
    pred, target = estimates.abs().float()[:, None], truths.abs().float()[:, None]
    side = min(pred.shape[-2:])
    window = 11 if side >= 11 else side - (1 - side % 2)  # the largest odd window that fits small test images
    return {"psnr": psnr(pred, target, 1.0).tolist(), "ssim": ssim(pred, target, 1.0, 2, win_size=window).tolist()}


def reconstruct(prior: DiffusionPrior, solver: str, operator, measured: torch.Tensor, settings: Mapping | None = None,
                seed: int = 0) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Run solver ``solver`` (a key of ``SOLVERS``) with ``settings``; returns the images ``[B, H, W]`` and the
    network evaluations it used per image batch."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}.")
    prior.nfe = 0
    shape = (measured.shape[0], *measured.shape[-2:])
    images = SOLVERS[solver](prior, operator, measured, shape, **dict(settings or {}), generator=torch.Generator().manual_seed(seed))
    return images, prior.nfe


def _solve(prior, solver, operator, measured, settings, num_posterior_samples, seed):
    """The reconstruction (magnitude ``[B, H, W]``; the posterior mean with >= 2 samples), the pixel-wise posterior
    standard deviation (or None) and the network evaluations per sample."""
    shape = (measured.shape[0], *measured.shape[-2:])
    if num_posterior_samples >= 2:
        prior.nfe = 0
        recon, std = posterior_statistics(
            lambda g: SOLVERS[solver](prior, operator, measured, shape, **dict(settings or {}), generator=g),
            num_posterior_samples, seed,
        )  # fmt: skip
        return recon, std, prior.nfe // num_posterior_samples
    images, nfe = reconstruct(prior, solver, operator, measured, settings, seed)
    return images.abs(), None, nfe


def _save_outputs(output_dir: Path, name: str, outputs: Mapping[str, torch.Tensor | None]) -> None:
    for suffix, image in outputs.items():
        if image is not None:
            save_nifti(image.float().cpu().numpy(), output_dir / f"{name}_{suffix}.nii.gz", channel_first=False)


def reconstruct_to_files(
    prior: DiffusionPrior, entries: Sequence[Mapping], protocol: Mapping, solver: str, settings: Mapping | None,
    output_dir: str | Path, num_coils: int = 0, num_posterior_samples: int = 1, seed: int = 0,
) -> list[dict]:  # fmt: skip
    """Reconstruct the fully sampled images of ``entries`` from simulated undersampled k-space and write, per
    entry, ``<name>_recon.nii.gz`` (magnitude), ``<name>_zero_filled.nii.gz`` and, with ``num_posterior_samples``
    >= 2, the posterior mean as the reconstruction and ``<name>_std.nii.gz`` (pixel-wise standard deviation of the
    magnitude); also ``samples.png`` (rows: zero-filled, reconstruction, fully sampled) and ``reconstructions.json``
    (measured sampling fraction, NFE, PSNR and SSIM per image). Returns the per-image records."""
    output_dir = Path(output_dir)
    truths = load_complex_images(entries)
    operator, measured = simulate_measurement(truths, protocol, num_coils, seed)
    recon, std, nfe = _solve(prior, solver, operator, measured, settings, num_posterior_samples, seed)
    aliased = zero_filled(operator, measured).abs()
    scores = magnitude_scores(recon, truths)
    records = []
    for index, entry in enumerate(entries):
        name = Path(entry["image"]).name.split(".nii")[0].removesuffix("_image")
        _save_outputs(output_dir, name, {"recon": recon[index], "zero_filled": aliased[index],
                                         "std": None if std is None else std[index]})  # fmt: skip
        records.append({"name": name, "psnr": scores["psnr"][index], "ssim": scores["ssim"][index]})
    rows = [aliased[:8], recon[:8], truths[:8].abs()]
    save_png_grid([image[None] for row in rows for image in row], output_dir / "samples.png", ncols=len(rows[0]),
                  value_range=(0, 1), rotate=False)  # fmt: skip
    write_json({"protocol": dict(protocol), "solver": solver, "settings": dict(settings or {}), "nfe": nfe,
                "sampling_fraction": sampling_fraction(operator.mask), "images": records},
               output_dir / "reconstructions.json")  # fmt: skip
    return records


def load_kspace(entry: Mapping, key: str = "kspace") -> tuple[torch.Tensor, torch.Tensor]:
    """Measured k-space ``[C, H, W]`` (complex64, C = 1 for single-coil) and its sampling mask ``[H, W]`` (bool)
    of one entry. ``entry[key]`` is a fastMRI-style HDF5 file (MONAI's ``FastMRIReader``: ``kspace`` [slices, H, W]
    or [slices, C, H, W], optional 1D ``mask`` over columns; ``entry["slice_index"]`` picks the slice, default the
    middle one) or a ``.npy`` complex array [H, W] or [C, H, W]. k-space is centred (DC in the middle) with an
    orthonormal FFT; without a stored mask, the sampled locations are those non-zero in any coil.

    Raises:
        ValueError: an unsupported file type, a wrong number of axes, NaN/Inf values, a slice out of range or a
            mask that does not match the k-space.
    """
    path = str(entry[key])
    stored_mask = None
    if path.endswith(".h5"):
        from monai.apps.reconstruction.fastmri_reader import FastMRIReader

        reader = FastMRIReader()
        content = reader.read(path)
        volume = np.asarray(content["kspace"])
        index = int(entry.get("slice_index", volume.shape[0] // 2))
        if not 0 <= index < volume.shape[0]:
            raise ValueError(f"slice_index {index} is out of range for '{path}' with {volume.shape[0]} slices.")
        kspace = volume[index]
        stored_mask = np.asarray(content["mask"]).astype(bool) if "mask" in content else None
    elif path.endswith(".npy"):
        kspace = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"'{path}': k-space must be a fastMRI-style .h5 file or a complex .npy array.")
    if kspace.ndim not in (2, 3) or not np.iscomplexobj(kspace):
        raise ValueError(f"'{path}': k-space must be complex [H, W] or [C, H, W], got {kspace.dtype} {kspace.shape}.")
    if not np.isfinite(kspace).all():
        raise ValueError(f"'{path}' holds NaN or Inf values.")
    kspace = torch.from_numpy(np.ascontiguousarray(kspace, dtype=np.complex64)).reshape(-1, *kspace.shape[-2:])
    if stored_mask is not None:
        if stored_mask.shape[-1] != kspace.shape[-1] or stored_mask.ndim > 2 or (
            stored_mask.ndim == 2 and stored_mask.shape[0] not in (1, kspace.shape[-2])
        ):
            raise ValueError(f"'{path}': mask of shape {stored_mask.shape} does not match k-space of shape "
                             f"{tuple(kspace.shape[-2:])} (a 1D mask over the {kspace.shape[-1]} columns or H x W).")  # fmt: skip
        mask = torch.from_numpy(np.broadcast_to(stored_mask, kspace.shape[-2:]).copy())
    else:
        mask = (kspace.abs() > 0).any(0)
    return kspace * mask, mask


def reconstruct_kspace_files(
    prior: DiffusionPrior, entries: Sequence[Mapping], solver: str, settings: Mapping | None, output_dir: str | Path,
    num_posterior_samples: int = 1, seed: int = 0, key: str = "kspace", coil_map_method: str = "acs_ratio",
) -> list[dict]:  # fmt: skip
    """Reconstruct measured k-space (``load_kspace``) and write per entry ``<name>_recon.nii.gz``,
    ``<name>_zero_filled.nii.gz`` and (with >= 2 posterior samples) ``<name>_std.nii.gz``, magnitudes in the
    scanner's units, plus ``samples.png`` (zero-filled, reconstruction per entry) and ``reconstructions.json``
    (sampling fraction, NFE, coils).
    Multi-coil data use SENSE with coil maps from the fully sampled centre (``estimate_coil_maps`` with
    ``coil_map_method``; the default ACS-ratio maps keep the combined image nearly real, closer to a prior trained
    on small phases than ESPIRiT's, which carry the first coil's phase). The data are
    scaled so the zero-filled magnitude peaks at 1, as the prior's training images did, and scaled back."""
    output_dir = Path(output_dir)
    records, previews = [], []
    for entry in entries:
        kspace, mask = load_kspace(entry, key)
        if kspace.shape[0] == 1:
            operator, measured = SingleCoilMRI(mask), kspace
        else:
            operator, measured = MultiCoilMRI(mask, estimate_coil_maps(kspace, mask, coil_map_method)), kspace[None]
        aliased = zero_filled(operator, measured).abs()
        scale = float(aliased.max().clamp_min(1e-12))
        recon, std, nfe = _solve(prior, solver, operator, measured / scale, settings, num_posterior_samples, seed)
        name = Path(str(entry[key])).name.split(".")[0] + (f"_s{int(entry['slice_index']):03d}" if "slice_index" in entry else "")
        _save_outputs(output_dir, name, {"recon": recon[0] * scale, "zero_filled": aliased[0],
                                         "std": None if std is None else std[0] * scale})  # fmt: skip
        previews += [aliased[:1] / scale, recon[:1]]
        records.append({"name": name, "sampling_fraction": sampling_fraction(mask), "nfe": nfe, "coils": kspace.shape[0]})
    save_png_grid(previews, output_dir / "samples.png", ncols=2, value_range=(0, 1), rotate=False)
    write_json({"solver": solver, "settings": dict(settings or {}), "images": records}, output_dir / "reconstructions.json")
    return records


def _summary(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def mri_report(
    prior: DiffusionPrior, test_images: torch.Tensor, validation_images: torch.Tensor, protocols: Mapping[str, Mapping],
    solvers: Mapping[str, Mapping], output_dir: str | Path, num_coils: int = 0,
    cs_weights: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), cs_iterations: int = 300,
    uncertainty_accelerations: Sequence[float] = (2, 4, 8), num_posterior_samples: int = 4, seed: int = 0,
    supervised_network: torch.nn.Module | None = None, supervised_protocol: Mapping | None = None,
) -> dict:  # fmt: skip
    """Reconstruct the test images under every protocol with zero-filling, TV and L1-wavelet CS (weights tuned per
    protocol on the validation images over ``cs_weights``), the ``supervised_network`` (zero-filled -> image,
    ``[B, 2, H, W]`` real/imaginary, trained on ``supervised_protocol`` only) when given, and every solver in
    ``solvers`` (name -> settings), then measure the posterior spread of the first solver over
    ``uncertainty_accelerations`` (uniform 1D masks). Writes into ``output_dir``: ``report.json``, ``results.csv``
    (one row per protocol and method) and ``figure.png`` (like chapter Fig. 7.1: one row per protocol with its mask,
    then every method's magnitude for the first test image, then the ground truth). Returns the report."""
    report: dict = {"num_test_images": int(test_images.shape[0]), "num_coils": num_coils, "protocols": {}}
    if supervised_network is not None:
        report["supervised_trained_on"] = dict(supervised_protocol or {})
    rows, figure = [], []
    for name, protocol in protocols.items():
        operator, measured = simulate_measurement(test_images, protocol, num_coils, seed)
        val_operator, val_measured = simulate_measurement(validation_images, protocol, num_coils, seed)

        def score(estimate, truth):
            return float(np.mean(magnitude_scores(estimate, truth)["psnr"]))

        logger.info(f"mri_report: protocol {name}: tuning TV and L1-wavelet weights on {len(validation_images)} slices")
        methods = {"zero_filled": (zero_filled(operator, measured), 0, {})}
        for method, function in (("tv", tv_reconstruction), ("l1_wavelet", l1_wavelet_reconstruction)):
            weight, _ = tune_regularisation(
                lambda w, f=function: f(val_operator, val_measured, w, iterations=cs_iterations), validation_images,
                cs_weights, score,
            )  # fmt: skip
            methods[method] = (function(operator, measured, weight, iterations=cs_iterations), 0, {"weight": weight})
        if supervised_network is not None:
            with torch.no_grad():
                estimate = supervised_network(complex_to_channels(methods["zero_filled"][0]))
            methods["supervised_unet"] = (channels_to_complex(estimate), 0, {})
        for solver, settings in solvers.items():
            logger.info(f"mri_report: protocol {name}: {solver} on {len(test_images)} slices")
            start = time.perf_counter()
            images, nfe = reconstruct(prior, solver, operator, measured, settings, seed)
            methods[solver] = (images, nfe, {"seconds": time.perf_counter() - start})
        entry = {"sampling_fraction": sampling_fraction(operator.mask), **dict(protocol), "methods": {}}
        figure += [operator.mask[None].float()] + [images[:1].abs() for images, _, _ in methods.values()]
        figure.append(test_images[:1].abs())
        for method, (images, nfe, extra) in methods.items():
            scores = magnitude_scores(images, test_images)
            residual = ((operator.A(images) - measured).flatten(1).norm(dim=1) / measured.flatten(1).norm(dim=1)).tolist()
            entry["methods"][method] = {
                "psnr": _summary(scores["psnr"]), "ssim": _summary(scores["ssim"]), "data_residual": max(residual),
                "nfe": nfe, **extra,
            }  # fmt: skip
            summary = entry["methods"][method]
            rows.append({
                "protocol": name, "method": method, "sampling_fraction": entry["sampling_fraction"],
                "psnr_mean": summary["psnr"]["mean"], "psnr_std": summary["psnr"]["std"],
                "ssim_mean": summary["ssim"]["mean"], "ssim_std": summary["ssim"]["std"],
                "data_residual": summary["data_residual"], "nfe": nfe, "seconds": extra.get("seconds", ""),
            })  # fmt: skip
        report["protocols"][name] = entry
        report["figure_columns"] = ["mask", *methods, "ground_truth"]
    output_dir = Path(output_dir)
    write_csv(output_dir / "results.csv", list(rows[0]), rows)
    save_png_grid(figure, output_dir / "figure.png", ncols=len(figure) // len(protocols), value_range=(0, 1), rotate=False)

    first_solver, first_settings = next(iter(solvers.items()))
    spread = {}
    for acceleration in uncertainty_accelerations:
        logger.info(f"mri_report: posterior spread at x{acceleration}, {num_posterior_samples} samples of {first_solver}")
        protocol = {"mask_kind": "uniform1d", "acceleration": acceleration, "center_fraction": 0.08}
        operator, measured = simulate_measurement(test_images, protocol, num_coils, seed)
        _, std = posterior_statistics(
            lambda g: SOLVERS[first_solver](prior, operator, measured, tuple(test_images.shape), **first_settings, generator=g),
            num_posterior_samples, seed,
        )  # fmt: skip
        spread[str(acceleration)] = float(std.mean())
    report["posterior_std_by_acceleration"] = {"solver": first_solver, "mean_std": spread}
    write_json(report, output_dir / "report.json")
    return report
