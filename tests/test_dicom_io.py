"""Tests of medgen_common.dicom_io: geometry and pixels survive a write/read round trip, every written series is
marked derived and synthetic with new UIDs and no copied patient identity, outputs pass dciodvfy (Debian's
dicom3tools) without errors, and bad series are refused with messages that name the file."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from medgen_common.dicom_io import (
    DicomSeriesError,
    SyntheticSeries,
    check_dicom_series,
    read_dicom_series,
    write_dicom_seg,
    write_dicom_series,
)


def _oblique_affine(theta: float = 0.3, origin=(-40.0, 20.0, 5.0)) -> np.ndarray:
    affine = np.eye(4)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = origin
    return affine


def _volume(seed: int = 0) -> MetaTensor:
    generator = torch.Generator().manual_seed(seed)
    return MetaTensor(torch.rand(1, 20, 24, 6, generator=generator) * 300.0, affine=torch.as_tensor(_oblique_affine()))


@pytest.fixture
def input_study(tmp_path):
    """A 'clinical' MR series with a named patient, as a PACS would hold it."""
    series = SyntheticSeries("scanner", "1")
    files = write_dicom_series(_volume(1), tmp_path / "input", series, "MR")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "MRN-12345", "19700101", "F"
        ds.save_as(path)
    return tmp_path / "input"


def test_mr_series_round_trip_keeps_geometry_and_values(tmp_path):
    image = _volume()
    files = write_dicom_series(image, tmp_path / "mr", SyntheticSeries("spade_vaegan", "0.3.1"), "MR")
    assert [path.name for path in files] == [f"IM{k:04d}.dcm" for k in range(1, 7)]
    back = read_dicom_series(tmp_path / "mr")
    assert back.shape == (1, 20, 24, 6)
    np.testing.assert_allclose(np.asarray(back.affine), _oblique_affine(), atol=1e-4)
    np.testing.assert_allclose(back.numpy(), image.numpy(), atol=300.0 / 65535)  # 16-bit quantisation
    assert back.meta["Modality"] == "MR"


def test_written_series_is_marked_synthetic_with_new_uids_and_no_patient_identity(tmp_path, input_study):
    reference = pydicom.dcmread(next(input_study.iterdir()))
    series = SyntheticSeries("spade_vaegan", "0.3.1", "T1-like", reference=reference)
    files = write_dicom_series(read_dicom_series(input_study), tmp_path / "out", series, "MR")
    written = [pydicom.dcmread(path) for path in files]
    for ds in written:
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "SYNTHETIC spade_vaegan 0.3.1 T1-like"
        assert "spade_vaegan 0.3.1" in ds.DerivationDescription
        assert ds.StudyInstanceUID != reference.StudyInstanceUID
        assert ds.SeriesInstanceUID != reference.SeriesInstanceUID
        assert ds.FrameOfReferenceUID != reference.get("FrameOfReferenceUID")
        assert str(ds.PatientName) == "SYNTHETIC^spade_vaegan" and ds.PatientID.startswith("SYNTH-")
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert "Doe" not in str(ds) and "MRN-12345" not in str(ds) and "19700101" not in str(ds)
    assert len({ds.SOPInstanceUID for ds in written}) == len(written)
    assert len({ds.SeriesInstanceUID for ds in written}) == 1


def test_patient_identity_is_copied_only_when_asked(tmp_path, input_study):
    reference = pydicom.dcmread(next(input_study.iterdir()))
    series = SyntheticSeries("spade_vaegan", "0.3.1", reference=reference, copy_patient=True, same_study=True)
    ds = pydicom.dcmread(write_dicom_series(_volume(), tmp_path / "out", series, "MR")[0])
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
        "Doe^Jane",
        "MRN-12345",
        "19700101",
        "F",
    )
    assert ds.StudyInstanceUID == reference.StudyInstanceUID and ds.SeriesInstanceUID != reference.SeriesInstanceUID
    with pytest.raises(ValueError, match="need the reference header"):
        SyntheticSeries("b", "1", copy_patient=True)


def test_ultrasound_and_rgb_elastogram_series(tmp_path):
    bmode = torch.rand(1, 32, 40, generator=torch.Generator().manual_seed(2))
    us = pydicom.dcmread(
        write_dicom_series(
            bmode, tmp_path / "us", SyntheticSeries("msk_csg", "0.2.0"), "US", np.diag([0.2, 0.3, 1, 1])
        )[0]
    )
    assert us.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1" and us.Modality == "US" and us.BitsAllocated == 8
    assert (us.Rows, us.Columns) == (40, 32)  # rows run along Y
    np.testing.assert_allclose(us.pixel_array.T / 255.0, bmode[0].numpy(), atol=0.5 / 255 + 1e-6)
    region = us.SequenceOfUltrasoundRegions[0]
    assert (region.PhysicalDeltaX, region.PhysicalDeltaY) == pytest.approx((0.02, 0.03))  # cm
    back = read_dicom_series(tmp_path / "us")  # the spacing comes back from the region calibration
    np.testing.assert_allclose(np.diag(np.asarray(back.affine))[:2], [-0.2, -0.3])
    np.testing.assert_allclose(back[0, :, :, 0].numpy() / 255.0, bmode[0].numpy(), atol=0.5 / 255 + 1e-6)  # 8-bit

    elastogram = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(3))
    sc = pydicom.dcmread(write_dicom_series(elastogram, tmp_path / "sc", SyntheticSeries("veg", "0.2.0"))[0])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.ConversionType == "SYN"
    assert sc.PhotometricInterpretation == "RGB" and sc.Modality == "US"
    np.testing.assert_allclose(sc.pixel_array.transpose(2, 1, 0) / 255.0, elastogram.numpy(), atol=0.5 / 255 + 1e-6)


def test_seg_over_a_written_series_holds_each_class(tmp_path):
    series = SyntheticSeries("spade_vaegan", "0.3.1")
    files = write_dicom_series(_volume(), tmp_path / "mr", series, "MR")
    label = torch.zeros(3, 20, 24, 6)
    label[0] = 1
    label[:, 5:10, 5:10, :] = torch.tensor([0.0, 1.0, 0.0])[:, None, None, None]
    label[:, 12:15, 3:9, 2:4] = torch.tensor([0.0, 0.0, 1.0])[:, None, None, None]
    seg_series = SyntheticSeries(
        "spade_vaegan", "0.3.1", "labels", reference=pydicom.dcmread(files[0]), same_study=True
    )
    path = write_dicom_seg(label, files, tmp_path / "seg" / "seg.dcm", seg_series, ["csf", "gm"])
    seg = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.SeriesDescription.startswith("SYNTHETIC spade_vaegan")
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["csf", "gm"]
    frames = seg.pixel_array.reshape(2, 6, 24, 20)  # segment-major frames [segment, slice, rows = Y, columns = X]
    np.testing.assert_array_equal(frames[0].transpose(2, 1, 0), label[1].numpy().astype(bool))
    np.testing.assert_array_equal(frames[1].transpose(2, 1, 0), label[2].numpy().astype(bool))
    assert seg.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_written_files_pass_dciodvfy_without_errors(tmp_path):
    mr = write_dicom_series(_volume(), tmp_path / "mr", SyntheticSeries("spade_vaegan", "0.3.1"), "MR")
    seg = write_dicom_seg(
        torch.nn.functional.one_hot(torch.randint(0, 3, (20, 24, 6)), 3).permute(3, 0, 1, 2).float(),
        mr,
        tmp_path / "seg.dcm",
        SyntheticSeries("spade_vaegan", "0.3.1"),
        ["csf", "gm"],
    )
    us = write_dicom_series(torch.rand(1, 16, 16), tmp_path / "us", SyntheticSeries("msk_csg", "0.2.0"), "US")
    sc = write_dicom_series(torch.rand(3, 16, 16), tmp_path / "sc", SyntheticSeries("veg", "0.2.0"))
    for path in (mr[0], seg, us[0], sc[0]):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        report = result.stdout + result.stderr
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], report


# --- bad series ------------------------------------------------------------------------------------------------------


def test_a_file_without_pixel_data_is_refused_naming_it(tmp_path):
    files = write_dicom_series(_volume(), tmp_path / "mr", SyntheticSeries("b", "1"), "MR")
    ds = pydicom.dcmread(files[2])
    del ds.PixelData
    ds.save_as(files[2])
    with pytest.raises(DicomSeriesError) as info:
        read_dicom_series(tmp_path / "mr")
    assert str(info.value) == (
        f"'{files[2]}' has no pixel data (SOP class 1.2.840.10008.5.1.4.1.1.4): it is not an image; give a folder "
        "that holds only the image series."
    )


def test_a_series_with_mixed_orientations_is_refused_naming_both_files(tmp_path):
    series = SyntheticSeries("b", "1")
    axial = write_dicom_series(_volume(), tmp_path / "a", series, "MR")
    tilted = write_dicom_series(
        MetaTensor(torch.rand(1, 20, 24, 1), affine=_oblique_affine(0.9)), tmp_path / "b", series
    )
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in axial:
        shutil.copy(path, folder / path.name)
    shutil.copy(tilted[0], folder / "LOCALISER.dcm")
    with pytest.raises(DicomSeriesError) as info:
        check_dicom_series(folder)
    message = str(info.value)
    assert message.startswith(
        f"mixed orientations in one series: '{folder / 'IM0001.dcm'}' has ImageOrientationPatient"
    )
    assert f"but '{folder / 'LOCALISER.dcm'}' has" in message and "split the series by orientation" in message


def test_two_series_in_one_folder_and_non_dicom_files_are_refused(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(_volume(), folder / "one", SyntheticSeries("b", "1"), "MR")
    write_dicom_series(_volume(), folder / "two", SyntheticSeries("b", "1"), "MR")
    with pytest.raises(DicomSeriesError, match=r"the input holds 2 series \(.*\); give the files of one"):
        check_dicom_series(folder)
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(DicomSeriesError, match=r"'.*notes.txt' is not a readable DICOM file: InvalidDicomError"):
        check_dicom_series([tmp_path / "notes.txt"])


def test_a_truncated_dicom_file_is_refused_not_read_as_zeros(tmp_path):
    files = write_dicom_series(_volume(), tmp_path / "mr", SyntheticSeries("b", "1"), "MR")
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[:-500])  # the end of the pixel data is lost
    with pytest.raises(DicomSeriesError) as info:
        read_dicom_series(tmp_path / "mr")
    assert str(info.value) == f"'{files[1]}' is truncated: its pixel data has 460 bytes, 24 x 20 pixels need 960."
    files[1].write_bytes(raw[:300])  # cut inside the header
    with pytest.raises(DicomSeriesError, match=rf"'{files[1]}' is not a complete DICOM file: it lacks \['SOPClassUID'"):
        read_dicom_series(tmp_path / "mr")
