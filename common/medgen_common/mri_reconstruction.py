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
from .mri import MultiCoilMRI, SingleCoilMRI, make_mask, sampling_fraction, synthetic_coil_maps
from .posterior_sampling import DiffusionPrior, dds, dps, posterior_statistics, predictor_corrector
from .writers import save_nifti, save_png_grid, write_json

__all__ = [
    "SOLVERS",
    "load_complex_images",
    "simulate_measurement",
    "magnitude_scores",
    "reconstruct",
    "reconstruct_to_files",
    "mri_report",
]

SOLVERS = {"dds": dds, "pc": predictor_corrector, "dps": dps}
logger = logging.getLogger(__name__)


def load_complex_images(entries: Sequence[Mapping], key: str = "image") -> torch.Tensor:
    """Complex images ``[B, H, W]`` (complex64) from channel-last NIfTI files holding (real, imaginary)."""
    images = []
    for entry in entries:
        array = np.asarray(LoadImage(image_only=True)(entry[key]), dtype=np.float32)
        if array.shape[-1] != 2:
            raise ValueError(f"'{entry[key]}' must hold real and imaginary parts on its last axis, got {array.shape}.")
        if not np.isfinite(array).all():
            raise ValueError(f"'{entry[key]}' holds NaN or Inf values.")
        array = array.reshape(array.shape[0], array.shape[1], 2)
        images.append(torch.complex(torch.from_numpy(array[..., 0]), torch.from_numpy(array[..., 1])))
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
    if num_posterior_samples >= 2:
        recon, std = posterior_statistics(
            lambda g: SOLVERS[solver](prior, operator, measured, tuple(truths.shape), **dict(settings or {}), generator=g),
            num_posterior_samples, seed,
        )  # fmt: skip
        nfe = prior.nfe // num_posterior_samples
    else:
        images, nfe = reconstruct(prior, solver, operator, measured, settings, seed)
        recon, std = images.abs(), None
    aliased = zero_filled(operator, measured).abs()
    scores = magnitude_scores(recon, truths)
    records = []
    for index, entry in enumerate(entries):
        name = Path(entry["image"]).name.split(".nii")[0].removesuffix("_image")
        outputs = {"recon": recon[index], "zero_filled": aliased[index], **({"std": std[index]} if std is not None else {})}
        for suffix, image in outputs.items():
            save_nifti(image.float().numpy(), output_dir / f"{name}_{suffix}.nii.gz", channel_first=False)
        records.append({"name": name, "psnr": scores["psnr"][index], "ssim": scores["ssim"][index]})
    rows = [aliased[:8], recon[:8], truths[:8].abs()]
    save_png_grid([image[None] for row in rows for image in row], output_dir / "samples.png", ncols=len(rows[0]),
                  value_range=(0, 1), rotate=False)  # fmt: skip
    write_json({"protocol": dict(protocol), "solver": solver, "settings": dict(settings or {}), "nfe": nfe,
                "sampling_fraction": sampling_fraction(operator.mask), "images": records},
               output_dir / "reconstructions.json")  # fmt: skip
    return records


def _summary(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def mri_report(
    prior: DiffusionPrior, test_images: torch.Tensor, validation_images: torch.Tensor, protocols: Mapping[str, Mapping],
    solvers: Mapping[str, Mapping], output_dir: str | Path, num_coils: int = 0,
    cs_weights: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), cs_iterations: int = 300,
    uncertainty_accelerations: Sequence[float] = (2, 4, 8), num_posterior_samples: int = 4, seed: int = 0,
) -> dict:  # fmt: skip
    """Reconstruct the test images under every protocol with zero-filling, TV and L1-wavelet CS (weights tuned per
    protocol on the validation images over ``cs_weights``) and every solver in ``solvers`` (name -> settings),
    then measure the posterior spread of the first solver over ``uncertainty_accelerations`` (uniform 1D masks).
    Writes ``report.json`` into ``output_dir`` and returns it."""
    report: dict = {"num_test_images": int(test_images.shape[0]), "num_coils": num_coils, "protocols": {}}
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
        for solver, settings in solvers.items():
            logger.info(f"mri_report: protocol {name}: {solver} on {len(test_images)} slices")
            start = time.perf_counter()
            images, nfe = reconstruct(prior, solver, operator, measured, settings, seed)
            methods[solver] = (images, nfe, {"seconds": time.perf_counter() - start})
        entry = {"sampling_fraction": sampling_fraction(operator.mask), **dict(protocol), "methods": {}}
        for method, (images, nfe, extra) in methods.items():
            scores = magnitude_scores(images, test_images)
            residual = ((operator.A(images) - measured).flatten(1).norm(dim=1) / measured.flatten(1).norm(dim=1)).tolist()
            entry["methods"][method] = {
                "psnr": _summary(scores["psnr"]), "ssim": _summary(scores["ssim"]), "data_residual": max(residual),
                "nfe": nfe, **extra,
            }  # fmt: skip
        report["protocols"][name] = entry

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
    write_json(report, Path(output_dir) / "report.json")
    return report
