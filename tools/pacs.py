"""Run a bundle on a study in a research PACS over DICOMweb and store the result back as a new, synthetic series.

    python -m tools.pacs run --bundle-dir demo/virtual_elastography_gan/bundle --demo \\
        --pacs http://127.0.0.1:8042/dicom-web --study 1.2.826.0.1.3680043.8.498.1... [--series UID] [--work pacs_run]

The bundle's ``configs/workflows.json`` (its ``pacs`` entry) says which datalist key its inference reads
(``input_key``), which input series to take (``input_modality``), which stored values map to its [0, 1] input
(``input_value_range``, e.g. [0, 255] for 8-bit ultrasound), which outputs to send back (``output_glob``) and as
what (``output_modality``: MR, US or SC). The tool pulls each matching series by WADO-RS, checks and reads it
(:func:`medgen_common.dicom_io.read_dicom_series`), writes it as NIfTI with a datalist, runs the bundle's own
inference, writes every output as a DICOM series marked derived and synthetic (new study, series and instance UIDs;
the patient is pseudonymous unless ``--copy-patient``), stores it by STOW-RS and returns the new UIDs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from medgen_common.dicom_io import SyntheticSeries, read_dicom_series, write_dicom_series
from medgen_common.writers import save_nifti, write_json
from tools import bundles as harness


class PacsUnavailableError(ConnectionError):
    """The PACS did not answer (down, wrong address, or hanging) within the timeout."""


def connect(url: str, timeout: float = 10.0):
    """A DICOMweb client for ``url`` after a QIDO-RS probe that must answer within ``timeout`` seconds, so a PACS
    that is down or hangs gives an error at once instead of a stalled run.

    Raises:
        PacsUnavailableError: no answer, a refused connection or an HTTP error, with the URL and the cause.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    probe = f"{url.rstrip('/')}/studies?limit=1"
    try:
        requests.get(probe, timeout=timeout, headers={"Accept": "application/dicom+json"}).raise_for_status()
    except requests.RequestException as err:
        raise PacsUnavailableError(
            f"the PACS at {url} did not answer a DICOMweb query within {timeout:g} s ({type(err).__name__}: {err}); "
            "check that it is running and that the URL is its DICOMweb root (e.g. http://host:8042/dicom-web)."
        ) from err
    return DICOMwebClient(url=url)


def _tag(dataset_json: dict, tag: str) -> str | None:
    """A value of a DICOM JSON (QIDO-RS) result, e.g. tag '0020000E' (SeriesInstanceUID)."""
    values = dataset_json.get(tag, {}).get("Value", [None])
    return values[0]


def input_series(client, study_uid: str, modality: str) -> list[str]:
    """The series UIDs of ``study_uid`` whose Modality is ``modality``."""
    found = client.search_for_series(study_instance_uid=study_uid)
    series = [_tag(item, "0020000E") for item in found if _tag(item, "00080060") == modality]
    if not series:
        modalities = sorted({str(_tag(item, "00080060")) for item in found})
        raise ValueError(f"study {study_uid} has no {modality} series (it has {modalities or 'no series'}).")
    return series


def _output_image(path: Path) -> np.ndarray:
    """A bundle output NIfTI (channels last, ``X x Y x 1 x C`` for 2D) as ``[C, X, Y, Z]``."""
    array = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    if array.ndim == 3:
        array = array[..., None]
    return np.moveaxis(array, -1, 0)


def run(
    bundle_dir: Path,
    pacs_url: str,
    study_uid: str,
    series_uids: list[str] | None = None,
    work_dir: Path | None = None,
    demo: bool = False,
    overrides: dict | None = None,
    copy_patient: bool = False,
    timeout: float = 10.0,
) -> dict:
    """Pull, infer, push (module docstring). Returns the new study UID and, per output, the new series UID.

    Raises:
        PacsUnavailableError: the PACS does not answer within ``timeout`` seconds (see :func:`connect`).
        ValueError: the study has no series of the bundle's input modality, or the bundle declares no PACS workflow.
        DicomSeriesError: a pulled series cannot be read (see :func:`medgen_common.dicom_io.check_dicom_series`).
    """
    bundle_dir = Path(bundle_dir).resolve()
    manifest = harness.load_manifest(bundle_dir)
    if "pacs" not in manifest:
        raise ValueError(f"{bundle_dir.name} declares no 'pacs' entry in configs/workflows.json.")
    entry = manifest["pacs"]
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="pacs_run_")).resolve()
    client = connect(pacs_url, timeout)
    series_uids = series_uids or input_series(client, study_uid, entry["input_modality"])

    items, sources = [], {}
    for index, series_uid in enumerate(series_uids):
        folder = work_dir / "input" / f"series_{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number, dataset in enumerate(client.retrieve_series(study_uid, series_uid)):
            dataset.save_as(folder / f"IM{number + 1:04d}.dcm", enforce_file_format=True)
        image = read_dicom_series(folder)
        low, high = entry.get("input_value_range", (0.0, 1.0))  # stored values -> the bundle's [0, 1]
        image = (image - low) / (high - low)
        name = f"series_{index:03d}"
        save_nifti(image[0], work_dir / "input" / f"{name}.nii.gz", affine=image.affine, channel_first=False)
        items.append({entry["input_key"]: f"input/{name}.nii.gz"})
        sources[name] = (folder, image)
    datalist = write_json({"test": items}, work_dir / "datalist.json")

    output_dir = work_dir / "output"
    values = {
        "dataset_dir": str(work_dir), "datalist": str(datalist), "output_dir": str(output_dir),
        "num_samples": len(items), **entry.get("overrides", {}), **(overrides or {}),
    }  # fmt: skip
    configs = harness.config_paths(bundle_dir, manifest["inference"]["config_files"], demo=demo)
    harness.run_workflow(bundle_dir, configs, overrides=values, log_file=work_dir / "inference.log")

    series = None
    stored = {}
    for name, (folder, image) in sources.items():
        outputs = sorted(output_dir.glob(entry["output_glob"].replace("*", f"{name}*", 1)))
        if not outputs:
            raise RuntimeError(
                f"the bundle wrote no '{entry['output_glob']}' for {name}; see {work_dir / 'inference.log'}."
            )
        reference = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        for output in outputs:
            series = SyntheticSeries(
                bundle_dir.name, metadata["version"], entry.get("description", ""), reference=reference,
                copy_patient=copy_patient, same_study=False,
            ) if series is None else series.next_series()  # fmt: skip
            files = write_dicom_series(
                _output_image(output), work_dir / "dicom" / output.name.split(".")[0], series,
                entry["output_modality"], affine=np.asarray(image.affine),
            )  # fmt: skip
            client.store_instances([pydicom.dcmread(path) for path in files])
            stored[output.name] = {"series": series.series_uid, "files": [str(path) for path in files]}
    return {"study": series.study_uid, "outputs": stored, "work_dir": str(work_dir)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="pull a study, run the bundle's inference, store the result")
    run_parser.add_argument("--bundle-dir", type=Path, required=True)
    run_parser.add_argument("--pacs", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    run_parser.add_argument("--study", required=True, help="StudyInstanceUID")
    run_parser.add_argument("--series", nargs="*", default=None, help="SeriesInstanceUIDs (default: by modality)")
    run_parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    run_parser.add_argument("--demo", action="store_true", help="merge configs/demo.json (a demo-trained bundle)")
    run_parser.add_argument("--copy-patient", action="store_true", help="copy the input's patient attributes")
    run_parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    run_parser.add_argument("--timeout", type=float, default=10.0, help="seconds the PACS has to answer the probe")
    args = parser.parse_args(argv)
    result = run(
        args.bundle_dir, args.pacs, args.study, args.series, args.work, args.demo,
        harness.parse_overrides(args.override), args.copy_patient, args.timeout,
    )  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
