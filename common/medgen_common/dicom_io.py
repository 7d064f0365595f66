"""DICOM in and out for research PACS: read a series into a MONAI image with its geometry; write generated images
as new, derived, synthetic series (MR, US, or Secondary Capture RGB for elastograms) and label maps as DICOM SEG.

Reading checks the series first (one series, pixel data in every file, one orientation, distinct slice positions)
and then reads it with MONAI's ``ITKReader``, so geometry follows MONAI's conventions: ``[1, X, Y, Z]`` with a
RAS ``affine`` in ``meta``.

Every written series is marked as what it is: ``ImageType`` DERIVED\\SECONDARY\\OTHER (SEG: DERIVED\\PRIMARY, which
its IOD requires), a ``SeriesDescription`` starting with ``SYNTHETIC`` that names the bundle and its version, a
``DerivationDescription``, and new Study, Series, SOP Instance and Frame of Reference UIDs. No attribute that
identifies the patient of an input study is copied unless ``copy_patient=True`` is passed: by default the patient
is ``SYNTHETIC^<bundle>`` with an ID derived from the new study UID.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from .writers import atomic_path

__all__ = [
    "DicomSeriesError",
    "SyntheticSeries",
    "check_dicom_series",
    "read_dicom_series",
    "write_dicom_series",
    "write_dicom_seg",
]

PATIENT_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "OtherPatientIDs",
    "IssuerOfPatientID",
)
SOP_CLASSES = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "SC": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


class DicomSeriesError(ValueError):
    """A DICOM input that cannot be read as one image series; the message names the file(s)."""


def _files(source: str | os.PathLike | Sequence) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise DicomSeriesError(f"'{folder}' is not a folder of DICOM files.")
        files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    else:
        files = [Path(path) for path in source]
    if not files:
        raise DicomSeriesError(f"no files in '{source}'.")
    return files


def check_dicom_series(source: str | os.PathLike | Sequence) -> list:
    """Headers of one DICOM image series (a folder or a list of files), sorted along the slice normal.

    Raises:
        DicomSeriesError: a file is not DICOM, is truncated or lacks its UIDs; a file has no pixel data (a
            structured report or presentation state, say); the files belong to several series; the orientations
            differ (e.g. a localiser mixed in); image sizes differ; or two slices share a position.
    """
    import pydicom

    headers = []
    for path in _files(source):
        try:
            header = pydicom.dcmread(path)
        except Exception as err:  # pydicom raises InvalidDicomError, EOFError, ...
            raise DicomSeriesError(f"'{path}' is not a readable DICOM file: {type(err).__name__}: {err}") from err
        header.filename = str(path)
        missing = [keyword for keyword in ("SOPClassUID", "SeriesInstanceUID") if not header.get(keyword)]
        if missing:
            raise DicomSeriesError(f"'{path}' is not a complete DICOM file: it lacks {missing} (truncated?).")
        if not any(keyword in header for keyword in _PIXEL_DATA):
            raise DicomSeriesError(
                f"'{path}' has no pixel data (SOP class {header.SOPClassUID}): it is not an image; give a folder "
                "that holds only the image series."
            )
        _check_pixel_data_length(header)
        headers.append(header)
    series = sorted({str(header.get("SeriesInstanceUID", "")) for header in headers})
    if len(series) > 1:
        raise DicomSeriesError(f"the input holds {len(series)} series ({', '.join(series)}); give the files of one.")
    first = headers[0]
    orientation = np.asarray(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    for header in headers[1:]:
        other = np.asarray(header.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
        if not np.allclose(orientation, other, atol=1e-4):
            raise DicomSeriesError(
                f"mixed orientations in one series: '{first.filename}' has ImageOrientationPatient "
                f"{orientation.round(4).tolist()} but '{header.filename}' has {other.round(4).tolist()}; split the "
                "series by orientation (a localiser or a reformat is often mixed in) and give one."
            )
        if (header.Rows, header.Columns) != (first.Rows, first.Columns):
            raise DicomSeriesError(
                f"'{header.filename}' is {header.Rows} x {header.Columns} pixels but '{first.filename}' is "
                f"{first.Rows} x {first.Columns}; one series must have one image size."
            )
    normal = np.cross(orientation[:3], orientation[3:])
    position = {
        header.filename: float(np.dot(normal, header.get("ImagePositionPatient", [0, 0, 0]))) for header in headers
    }
    headers.sort(key=lambda header: position[header.filename])
    for before, after in zip(headers, headers[1:]):
        if abs(position[after.filename] - position[before.filename]) < 1e-3 and len(headers) > 1:
            raise DicomSeriesError(
                f"'{before.filename}' and '{after.filename}' lie at the same slice position; the folder holds "
                "duplicates or more than one acquisition."
            )
    return headers


def _check_pixel_data_length(header) -> None:
    """Refuse uncompressed pixel data shorter than its rows x columns x samples x frames (a truncated file, which
    pydicom and ITK otherwise read without a word); then drop it from the header, ITK reads the pixels."""
    if "PixelData" not in header or header.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = (
        int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1))
        * int(header.get("NumberOfFrames", 1) or 1) * int(header.BitsAllocated) // 8
    )  # fmt: skip
    if len(header.PixelData) < expected:
        raise DicomSeriesError(
            f"'{header.filename}' is truncated: its pixel data has {len(header.PixelData)} bytes, "
            f"{header.Rows} x {header.Columns} pixels need {expected}."
        )
    del header.PixelData


def read_dicom_series(folder: str | os.PathLike) -> MetaTensor:
    """Read the one image series in ``folder`` as ``[1, X, Y, Z]`` float32 with MONAI's ``ITKReader`` (RAS affine in
    ``meta``; rescale slope and intercept applied; ultrasound spacing from its region calibration), after
    :func:`check_dicom_series`. ``meta`` also holds the
    series' ``Modality``, ``StudyInstanceUID`` and ``SeriesInstanceUID``.

    Raises:
        DicomSeriesError: see :func:`check_dicom_series`.
    """
    headers = check_dicom_series(folder)
    image = LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True, dtype=np.float32)(
        os.fspath(folder)
    )
    spacing = _ultrasound_spacing_mm(headers[0])
    if spacing is not None:  # ITK knows only PixelSpacing; ultrasound keeps it in its region calibration
        image.affine = torch.as_tensor(np.asarray(image.affine) @ np.diag([*spacing, 1.0, 1.0]))
    for keyword in ("Modality", "StudyInstanceUID", "SeriesInstanceUID"):
        image.meta[keyword] = str(headers[0].get(keyword, ""))
    return image


def _ultrasound_spacing_mm(header) -> tuple[float, float] | None:
    """(column, row) spacing in mm from the first ultrasound region calibrated in cm, when PixelSpacing is absent."""
    if "PixelSpacing" in header or "SequenceOfUltrasoundRegions" not in header:
        return None
    for region in header.SequenceOfUltrasoundRegions:
        if region.get("PhysicalUnitsXDirection") == 3 and region.get("PhysicalUnitsYDirection") == 3:
            return 10.0 * float(region.PhysicalDeltaX), 10.0 * float(region.PhysicalDeltaY)
    return None


class SyntheticSeries:
    """The identity shared by the files of one written series: new UIDs, the bundle that made it, and the patient
    and study attributes (pseudonymous unless ``copy_patient``).

    Args:
        bundle: the bundle name, e.g. ``"spade_vaegan"``; version: its version (``metadata.json``).
        description: what the series shows, appended to the SeriesDescription.
        reference: a header of the input study (pydicom Dataset), or None for images generated from nothing.
        copy_patient: copy the patient attributes of ``reference`` (only when the user asks for it).
        same_study: keep the input's StudyInstanceUID (results stored back beside their input); default a new study.
        series_number: the SeriesNumber to write.
    """

    def __init__(
        self,
        bundle: str,
        version: str,
        description: str = "",
        reference=None,
        copy_patient: bool = False,
        same_study: bool = False,
        series_number: int = 9001,
    ):
        from pydicom.uid import generate_uid

        if (copy_patient or same_study) and reference is None:
            raise ValueError("copy_patient and same_study need the reference header of an input study.")
        self.bundle, self.version, self.reference = bundle, version, reference
        self.copy_patient, self.series_number = copy_patient, series_number
        self.study_uid = str(reference.StudyInstanceUID) if same_study else generate_uid()
        self.series_uid, self.frame_of_reference_uid = generate_uid(), generate_uid()
        self.description = f"SYNTHETIC {bundle} {version}" + (f" {description}" if description else "")
        now = datetime.datetime.now()
        self.date, self.time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    def next_series(self) -> SyntheticSeries:
        """Another new series in this one's study, with the same patient identity and the next series number."""
        from pydicom.uid import generate_uid

        following = copy.copy(self)
        following.series_uid, following.series_number = generate_uid(), self.series_number + 1
        return following

    def dataset(self, sop_class_uid: str, modality: str, instance_number: int):
        """A pydicom ``FileDataset`` holding the patient, study, series, equipment and SOP common attributes."""
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, meta.MediaStorageSOPInstanceUID
        if self.copy_patient:
            for keyword in PATIENT_ATTRIBUTES:
                if keyword in self.reference:
                    setattr(ds, keyword, self.reference.data_element(keyword).value)
        else:
            ds.PatientName = f"SYNTHETIC^{self.bundle}"
            ds.PatientID = f"SYNTH-{self.study_uid[-12:]}"
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = self.date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = self.time
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, self.series_number, instance_number
        ds.SeriesDescription = self.description[:64]
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "medgen-bundles", self.bundle, self.version
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.Laterality, ds.PatientOrientation = "", ""
        ds.DerivationDescription = f"synthetic image generated by the MONAI bundle {self.bundle} {self.version}"[:1024]
        ds.BurnedInAnnotation = "NO"
        return ds


def _pixels(ds, frame: np.ndarray, rgb: bool, eight_bit: bool) -> None:
    """Store one frame ``[rows, columns(, 3)]``. RGB and ultrasound (whose IOD allows only 8 bits) as 8-bit, from
    values in [0, 1] (or already in [0, 255]); other grey images as 16-bit unsigned with a rescale slope and
    intercept that map back to the float values (MR intensities have no unit; the rescale keeps them exactly)."""
    ds.Rows, ds.Columns = frame.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if rgb else (1, "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PixelRepresentation = 0
    if rgb or eight_bit:
        scale = 255.0 if float(frame.max()) <= 1.0 else 1.0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.clip(np.rint(frame * scale), 0, 255).astype(np.uint8).tobytes()
        return
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    low, high = float(frame.min()), float(frame.max())
    ds.RescaleIntercept = f"{low:.8g}"[:16]
    ds.RescaleSlope = f"{(high - low) / 65535.0 if high > low else 1.0:.8g}"[:16]
    ds.RescaleType = "US"  # unspecified units
    stored = np.rint((frame - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    ds.PixelData = np.clip(stored, 0, 65535).astype(np.uint16).tobytes()


def write_dicom_series(
    image: np.ndarray | torch.Tensor,
    output_dir: str | os.PathLike,
    series: SyntheticSeries,
    modality: str = "MR",
    affine: np.ndarray | None = None,
) -> list[Path]:
    """Write a generated image as one DICOM series, one file per slice (``IM0001.dcm``, ...), each atomically.

    Args:
        image: grey ``[1, X, Y, Z]``, ``[X, Y, Z]`` or one slice ``[1, X, Y]`` (MR, US), or RGB ``[3, X, Y(, Z)]``
            (written as Secondary Capture, e.g. an elastogram); a MetaTensor brings its affine.
        series: the identity of the new series.
        modality: ``"MR"`` (MR Image Storage), ``"US"`` (Ultrasound Image Storage; spacing in the ultrasound
            region calibration) or ``"SC"`` (Secondary Capture with ConversionType SYN; RGB images always are).
        affine: RAS affine of the voxel grid (mm); default the MetaTensor's, else identity.

    Returns:
        The written files, in slice order.
    """
    if affine is None:
        affine = image.affine if isinstance(image, MetaTensor) else np.eye(4)
    affine = np.asarray(torch.as_tensor(affine).double().cpu(), float)
    array = np.asarray(torch.as_tensor(image).detach().float().cpu())
    if array.ndim == 3:  # [1 or 3, X, Y] is one channel-first slice, anything else a channel-less volume
        array = array[..., None] if array.shape[0] in (1, 3) else array[None]
    if array.ndim != 4 or array.shape[0] not in (1, 3):
        raise ValueError(
            f"image must be [1, X, Y(, Z)], [X, Y, Z] or RGB [3, X, Y(, Z)], got shape {tuple(image.shape)}."
        )
    rgb = array.shape[0] == 3
    if rgb:
        modality = "SC"
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, got '{modality}'.")
    # the Modality attribute: Secondary Capture RGB images here are elastograms, derived from ultrasound
    modality_attribute = {"MR": "MR", "US": "US", "SC": "US" if rgb else "OT"}[modality]
    lps = _LPS @ affine
    column_step, row_step = lps[:3, 0], lps[:3, 1]  # along X (DICOM columns) and Y (DICOM rows)
    spacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step))]  # DICOM: row, column spacing
    orientation = np.concatenate([column_step / spacing[1], row_step / spacing[0]])
    slice_step = float(np.linalg.norm(lps[:3, 2]))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(array.shape[-1]):
        frame = np.moveaxis(array[..., k], 0, -1).transpose(1, 0, 2)  # [rows = Y, columns = X, samples]
        frame = frame if rgb else frame[..., 0]
        ds = series.dataset(SOP_CLASSES[modality], modality_attribute, k + 1)
        _pixels(ds, frame, rgb, eight_bit=modality == "US")
        if modality == "MR":
            ds.FrameOfReferenceUID = series.frame_of_reference_uid
            _mr_attributes(ds, lps, k, spacing, orientation, slice_step, array.shape[-1])
        elif modality == "US":
            _us_attributes(ds, spacing)
        else:
            ds.ConversionType = "SYN"
            ds.PixelSpacing = [f"{value:.6g}" for value in spacing]
        path = output_dir / f"IM{k + 1:04d}.dcm"
        with atomic_path(path) as temporary:
            ds.save_as(temporary, enforce_file_format=True)
        written.append(path)
    return written


def _mr_attributes(ds, lps: np.ndarray, k: int, spacing, orientation, slice_step: float, slices: int) -> None:
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [f"{value:.6g}" for value in spacing]
    ds.ImageOrientationPatient = [f"{value:.6f}" for value in orientation]
    ds.ImagePositionPatient = [f"{value:.6f}" for value in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
    ds.SliceThickness = f"{slice_step:.6g}"
    ds.SliceLocation = f"{float(np.dot(np.cross(orientation[:3], orientation[3:]), lps[:3, 3] + k * lps[:3, 2])):.6f}"
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
    ds.MRAcquisitionType = "3D" if slices > 1 else "2D"
    ds.EchoTime, ds.EchoTrainLength, ds.RepetitionTime = "", "", ""
    ds.PatientPosition = ""


def _us_attributes(ds, spacing) -> None:
    from pydicom.dataset import Dataset

    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = ds.Columns - 1, ds.Rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX, region.PhysicalDeltaY = spacing[1] / 10.0, spacing[0] / 10.0
    ds.SequenceOfUltrasoundRegions = [region]


def write_dicom_seg(
    label: np.ndarray | torch.Tensor,
    source_files: Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    series: SyntheticSeries,
    class_names: Sequence[str],
) -> Path:
    """Write a label map over a written image series as one DICOM SEG (highdicom), atomically.

    Args:
        label: ``[C, X, Y, Z]`` probabilities or one-hot with channel 0 the background, or ``[X, Y, Z]`` class
            indices; same grid as the source series.
        source_files: the image series the segmentation refers to (e.g. from :func:`write_dicom_series`).
        class_names: names of the non-background classes 1..C-1, coded in a private scheme (``99MEDGEN``).
    """
    import highdicom as hd
    import pydicom

    array = np.asarray(torch.as_tensor(label).detach().cpu())
    indices = array.argmax(0) if array.ndim == 4 else array.astype(np.int64)
    sources = sorted((pydicom.dcmread(path) for path in source_files), key=lambda ds: int(ds.InstanceNumber))
    if indices.shape[-1] != len(sources):
        raise ValueError(f"the label map has {indices.shape[-1]} slices but the source series {len(sources)}.")
    pixels = indices.transpose(2, 1, 0).astype(np.uint8)  # [frames, rows = Y, columns = X]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=series.bundle, version=series.version, family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing")
    )
    category = hd.sr.CodedConcept("85756007", "SCT", "Tissue")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(name.upper()[:16], "99MEDGEN", name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(class_names, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series.series_uid,
        series_number=series.series_number,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
        manufacturer="medgen-bundles",
        manufacturer_model_name=series.bundle,
        software_versions=series.version,
        device_serial_number="0",
        content_label="SYNTHETIC",
        content_description=series.description[:64],
        omit_empty_frames=False,
    )
    seg.SeriesDescription = series.description[:64]  # highdicom takes patient and study from the sources
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output_path) as temporary:
        seg.save_as(temporary)
    return output_path
