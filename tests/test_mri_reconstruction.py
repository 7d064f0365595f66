"""The reconstruction report: every method under every protocol, hard data consistency for the diffusion solvers,
and the posterior spread by acceleration; with a white-Gaussian oracle prior so no training is needed."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from PIL import Image
from monai.networks.schedulers import DDPMScheduler

from medgen_common.mri import channels_to_complex, fft2c, make_mask, synthetic_coil_maps
from medgen_common.mri_reconstruction import (
    load_complex_images,
    load_kspace,
    mri_report,
    reconstruct_kspace_files,
    simulate_measurement,
)
from medgen_common.runtime import load_trained
from medgen_common.transforms import RandUndersampled
from medgen_common.writers import save_nifti
from medgen_common.posterior_sampling import DiffusionPrior
from test_posterior_sampling import GaussianOracle


def _images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    disc = ((rows**2 + cols**2) < 0.6).float()
    return torch.stack([disc * (0.5 + 0.5 * torch.rand((), generator=generator)) for _ in range(count)]).to(torch.complex64)


def test_report_scores_every_method_and_keeps_hard_data_consistency(tmp_path):
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod
    prior = DiffusionPrior(GaussianOracle(alphas_cumprod), alphas_cumprod, "complex")
    protocols = {"uniform_x4": {"mask_kind": "uniform1d", "acceleration": 4, "center_fraction": 0.125}}
    solvers = {"dds": {"num_steps": 10}, "pc": {"num_levels": 10}, "mcg": {"num_steps": 5}}
    identity = torch.nn.Identity()  # a "supervised network" that returns its zero-filled input
    report = mri_report(prior, _images(3, 0), _images(2, 1), protocols, solvers, tmp_path, cs_weights=[1e-3, 1e-2],
                        cs_iterations=20, uncertainty_accelerations=[2, 8], num_posterior_samples=2,
                        supervised_network=identity, supervised_protocol=protocols["uniform_x4"])  # fmt: skip
    assert json.loads((tmp_path / "report.json").read_text()) == report
    entry = report["protocols"]["uniform_x4"]
    assert abs(entry["sampling_fraction"] - 0.25) < 0.01
    assert set(entry["methods"]) == {"zero_filled", "tv", "l1_wavelet", "supervised_unet", "dds", "pc", "mcg"}
    assert entry["methods"]["supervised_unet"]["psnr"] == entry["methods"]["zero_filled"]["psnr"]
    assert report["supervised_trained_on"]["mask_kind"] == "uniform1d"
    assert report["figure_columns"] == ["mask", *entry["methods"], "ground_truth"]
    assert entry["methods"]["dds"]["nfe"] == 10 and entry["methods"]["pc"]["nfe"] == 20
    assert entry["methods"]["mcg"]["nfe"] == 5
    for solver in ("dds", "pc", "mcg"):
        assert entry["methods"][solver]["data_residual"] < 1e-3
    with open(tmp_path / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["method"] for row in rows] == list(entry["methods"])
    assert float(rows[-1]["psnr_mean"]) == entry["methods"]["mcg"]["psnr"]["mean"]
    figure = np.asarray(Image.open(tmp_path / "figure.png"))
    assert figure.shape[1] > figure.shape[0] * 4  # one row: mask, 7 methods, ground truth
    assert entry["methods"]["tv"]["weight"] in (1e-3, 1e-2)
    assert set(report["posterior_std_by_acceleration"]["mean_std"]) == {"2", "8"}


def test_measurement_is_multi_coil_when_asked():
    operator, measured = simulate_measurement(_images(2, 0), {"mask_kind": "poisson", "acceleration": 4}, num_coils=4)
    assert measured.shape == (2, 4, 16, 16) and operator.sensitivity.shape == (4, 16, 16)


def _oracle_prior() -> DiffusionPrior:
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod
    return DiffusionPrior(GaussianOracle(alphas_cumprod), alphas_cumprod, "complex")


def test_measured_kspace_is_reconstructed_in_scanner_units(tmp_path):
    noise = 0.01 * torch.randn(16, 16, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    image = (_images(1, 0)[0] + noise) * 1000.0  # scanner units, no k-space sample exactly zero
    mask = make_mask("uniform1d", (16, 16), 2, center_fraction=0.25, seed=0)
    np.save(tmp_path / "single.npy", (fft2c(image) * mask).numpy())
    maps = synthetic_coil_maps((16, 16), 4)
    coil_kspace = fft2c(image * maps)  # fully sampled; the file's 1D mask says which columns were acquired
    with h5py.File(tmp_path / "multi.h5", "w") as file:
        file["kspace"] = torch.stack([coil_kspace, coil_kspace]).numpy()  # [slices, coils, H, W]
        file["mask"] = mask[0].numpy().astype(np.float32)
    entries = [{"kspace": str(tmp_path / "single.npy")}, {"kspace": str(tmp_path / "multi.h5"), "slice_index": 1}]
    records = reconstruct_kspace_files(_oracle_prior(), entries, "dds", {"num_steps": 5}, tmp_path / "out",
                                       num_posterior_samples=2)  # fmt: skip
    assert [r["name"] for r in records] == ["single", "multi_s001"] and [r["coils"] for r in records] == [1, 4]
    assert all(abs(r["sampling_fraction"] - float(mask.float().mean())) < 1e-6 and r["nfe"] == 5 for r in records), records
    recon = np.asarray(LoadImage(image_only=True)(str(tmp_path / "out" / "single_recon.nii.gz")))
    zero_filled = np.asarray(LoadImage(image_only=True)(str(tmp_path / "out" / "single_zero_filled.nii.gz")))
    assert recon.shape[:2] == (16, 16) and 200 < zero_filled.max() < 2000 and 200 < recon.max() < 5000
    assert (tmp_path / "out" / "multi_s001_std.nii.gz").is_file() and (tmp_path / "out" / "samples.png").is_file()


def test_bad_kspace_files_are_refused(tmp_path):
    np.save(tmp_path / "real.npy", np.zeros((8, 8), dtype=np.float32))
    bad = np.zeros((8, 8), dtype=np.complex64)
    bad[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="complex"):
        load_kspace({"kspace": str(tmp_path / "real.npy")})
    with pytest.raises(ValueError, match="NaN"):
        load_kspace({"kspace": str(tmp_path / "nan.npy")})
    with pytest.raises(ValueError, match=".h5 file or a complex .npy"):
        load_kspace({"kspace": str(tmp_path / "kspace.nii.gz")})
    with h5py.File(tmp_path / "mismatch.h5", "w") as file:
        file["kspace"] = np.ones((1, 8, 8), dtype=np.complex64)
        file["mask"] = np.ones(6, dtype=np.float32)
    with pytest.raises(ValueError, match=r"mask of shape \(6,\) does not match k-space of shape \(8, 8\)"):
        load_kspace({"kspace": str(tmp_path / "mismatch.h5")})
    with pytest.raises(ValueError, match="slice_index 3 is out of range"):
        load_kspace({"kspace": str(tmp_path / "mismatch.h5"), "slice_index": 3})


def test_images_load_as_complex_or_magnitude_with_unit_peak(tmp_path):
    complex_image = np.stack([np.full((8, 6), 2.0), np.full((8, 6), -2.0)], -1)[:, :, None]  # H x W x 1 x 2
    save_nifti(complex_image.astype(np.float32), tmp_path / "complex.nii.gz", channel_first=False)
    save_nifti(np.full((8, 6, 1), 5.0, np.float32), tmp_path / "magnitude.nii.gz", channel_first=False)
    save_nifti(np.ones((8, 6, 3), np.float32), tmp_path / "rgb.nii.gz", channel_first=False)
    save_nifti(np.ones((8, 8, 1), np.float32), tmp_path / "square.nii.gz", channel_first=False)
    images = load_complex_images([{"image": str(tmp_path / name)} for name in ("complex.nii.gz", "magnitude.nii.gz")])
    assert images.shape == (2, 8, 6) and torch.allclose(images.abs(), torch.ones(2, 8, 6))
    assert torch.allclose(images[0].angle(), torch.full((8, 6), -np.pi / 4)) and images[1].imag.abs().max() == 0
    with pytest.raises(ValueError, match="rgb.nii.gz.*magnitude image"):
        load_complex_images([{"image": str(tmp_path / "rgb.nii.gz")}])
    with pytest.raises(ValueError, match="square.nii.gz.*one size"):
        load_complex_images([{"image": str(tmp_path / name)} for name in ("magnitude.nii.gz", "square.nii.gz")])


def test_undersampling_transform_keeps_the_target_and_draws_a_new_mask_each_call():
    image = torch.stack([_images(1, 0)[0].real, torch.zeros(16, 16)])  # [2, H, W]
    transform = RandUndersampled("image", "uniform1d", 4, center_fraction=0.125)
    transform.set_random_state(0)
    first, second = transform({"image": image}), transform({"image": image})
    assert torch.equal(first["label"], image) and first["image"].shape == (2, 16, 16)
    assert not torch.equal(first["image"], second["image"])  # a fresh mask
    kspace = fft2c(channels_to_complex(first["image"][None]))[0]
    assert abs(float((kspace.abs() > 1e-6).any(0).float().mean()) - 0.25) <= 0.07  # sampled columns
    with pytest.raises(ValueError, match=r"\[2, H, W\]"):
        transform({"image": torch.zeros(1, 16, 16)})


def test_loading_missing_weights_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="supervised.pt"):
        load_trained(torch.nn.Linear(2, 2), tmp_path / "supervised.pt")
