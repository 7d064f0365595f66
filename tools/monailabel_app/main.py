"""A MONAI Label app that serves trained medgen bundles as infer tasks (``InferType.OTHERS``: they make images).

    monailabel start_server --app tools/monailabel_app --studies <folder of NIfTI images> \\
        --conf bundles_dir demo --conf demo true

``bundles_dir`` holds the trained bundles, as ``<dir>/<name>/bundle`` (what ``make demo`` leaves) or ``<dir>/<name>``;
``demo`` merges each bundle's ``configs/demo.json`` (for demo-trained bundles); ``bundles`` picks the tasks (default
both). Every request runs the bundle's own inference with MONAI's bundle runner, so the server gives what
``python -m monai.bundle run`` gives:

- ``virtual_elastography_gan``: the request's image is a B-mode ultrasound image (values in [0, 1]); the result is
  the virtual strain elastogram (RGB, channels last).
- ``spade_vaegan``: the request's image is a probabilistic label map (channels last, background first); ``params``
  carries ``style`` (a path or a datastore image id of an MR slice of the wanted contrast) and ``contrast`` (one of
  the bundle's contrasts); the result is the synthetic MR image.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # the app runs inside the MONAI Label server: make `tools` importable

from tools import bundles as harness  # noqa: E402

logger = logging.getLogger(__name__)


def _trained_bundle(bundles_dir: Path, name: str) -> Path:
    for candidate in (bundles_dir / name / "bundle", bundles_dir / name):
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate
    raise FileNotFoundError(f"no trained bundle '{name}' under '{bundles_dir}' (looked for <dir>/{name}/bundle).")


class BundleInfer(InferTask):
    """Runs a trained bundle's inference on the request's image; subclasses say how a request becomes the bundle's
    datalist and overrides (:meth:`prepare`)."""

    output_glob = "*.nii.gz"

    def __init__(self, bundle_root: Path, demo: bool, description: str, dimension: int = 2):
        self.bundle_root, self.demo = Path(bundle_root), demo
        metadata = json.loads((self.bundle_root / "configs" / "metadata.json").read_text())
        super().__init__(
            type=InferType.OTHERS, labels=None, dimension=dimension,
            description=f"{description} ({self.bundle_root.name} {metadata['version']}; synthetic output)",
            config={"device": "cpu"},
        )  # fmt: skip

    def is_valid(self) -> bool:
        return (self.bundle_root / "models").is_dir()

    def prepare(self, request: dict, work: Path) -> tuple[dict, dict]:
        """The datalist (written to ``work/datalist.json``) and the overrides for one request."""
        raise NotImplementedError

    def __call__(self, request: dict) -> tuple[str, dict]:
        work = Path(tempfile.mkdtemp(prefix=f"monailabel_{self.bundle_root.name}_"))
        datalist, overrides = self.prepare(request, work)
        (work / "datalist.json").write_text(json.dumps(datalist))
        manifest = harness.load_manifest(self.bundle_root)
        configs = harness.config_paths(self.bundle_root, manifest["inference"]["config_files"], demo=self.demo)
        values = {
            "dataset_dir": str(work), "datalist": str(work / "datalist.json"), "output_dir": str(work / "output"),
            "device_name": request.get("device", "cpu"), **overrides,
        }  # fmt: skip
        harness.run_workflow(self.bundle_root, configs, overrides=values, log_file=work / "inference.log")
        outputs = sorted((work / "output").glob(self.output_glob))
        if len(outputs) != 1:
            raise RuntimeError(f"{self.bundle_root.name} wrote {len(outputs)} outputs, expected 1; see {work}.")
        return str(outputs[0]), {"bundle": self.bundle_root.name, "synthetic": True, "log": str(work / "inference.log")}


class ElastographyInfer(BundleInfer):
    """B-mode ultrasound -> virtual strain elastogram."""

    output_glob = "*_elastogram.nii.gz"

    def prepare(self, request: dict, work: Path) -> tuple[dict, dict]:
        return {"test": [{"bmode": request["image"]}]}, {"inference_split": "test", "num_samples": 1}


class SpadeInfer(BundleInfer):
    """Label map + style image of a contrast -> MR image of that contrast."""

    def __init__(self, bundle_root: Path, demo: bool, description: str, datastore):
        super().__init__(bundle_root, demo, description)
        self.datastore = datastore
        values = harness.parse_config_values(
            self.bundle_root,
            harness.config_paths(self.bundle_root, ["configs/inference.json"], demo=demo),
            ["contrasts"],
        )
        self.contrasts = list(values["contrasts"])
        self._config.update({"contrast": self.contrasts, "style": ""})

    def prepare(self, request: dict, work: Path) -> tuple[dict, dict]:
        contrast = request.get("contrast") or self.contrasts[0]
        if isinstance(contrast, list):
            contrast = contrast[0]
        if contrast not in self.contrasts:
            raise ValueError(f"contrast '{contrast}' is not one of {self.contrasts}.")
        style = request.get("style")
        if not style:
            raise ValueError("spade_vaegan needs params.style: a path or image id of a slice of the wanted contrast.")
        style = style if Path(style).is_file() else self.datastore.get_image_uri(style)
        # the style pool names every contrast; only the requested one is drawn
        datalist = {"test": [{name: style for name in self.contrasts}]}
        overrides = {
            "label_glob": request["image"], "synthesis_contrasts": [contrast], "style_split": "test",
            "use_rejection": False, "num_samples": 1,
        }  # fmt: skip
        return datalist, overrides


class MedgenBundlesApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict):
        self.bundles_dir = Path(conf.get("bundles_dir", REPO_ROOT / "demo")).resolve()
        self.demo = conf.get("demo", "false").lower() in ("1", "true", "yes")
        self.served = conf.get("bundles", "virtual_elastography_gan,spade_vaegan").split(",")
        super().__init__(
            app_dir=app_dir, studies=studies, conf=conf, name="medgen-bundles",
            description="Synthetic images from medgen bundles (research use; outputs are synthetic)",
        )  # fmt: skip

    def init_infers(self) -> dict[str, InferTask]:
        tasks = {
            "virtual_elastography_gan": lambda root: ElastographyInfer(root, self.demo, "B-mode to virtual elastogram"),
            "spade_vaegan": lambda root: SpadeInfer(
                root, self.demo, "label map + style image to MR image", self.datastore()
            ),
        }
        return {name: tasks[name](_trained_bundle(self.bundles_dir, name)) for name in self.served}
