"""The brainSPADE pipeline and its central claim, from one command: synthetic label maps from
``brainspade_label_ldm``, synthetic images of them from ``spade_vaegan``, then the same segmenter trained on real,
synthetic and real + synthetic data and tested on held-out real subjects (Dice per tissue, in 3D).

    python -m tools.brainspade_pipeline --demo-dir demo [--num-labels 400] [--contrast t1] [--ood-contrast flair]

``--demo-dir`` is the output of ``python -m tools.run_demo`` (trained bundles in ``<demo>/<bundle>/bundle``, data in
``<demo>/<bundle>/data``); ``--label-bundle``, ``--image-bundle`` and ``--dataset-dir`` point elsewhere. Writes
``<out>/labels``, ``<out>/images``, ``<out>/datalist_synthetic.json`` (a ready-to-train dataset) and
``<out>/downstream.json`` / ``downstream.md``.

Out-of-distribution case (``--ood-contrast``): the segmenter never sees that contrast in real training; the
synthetic set is styled with slices of it, and all sets are tested on real images of it (chapter Table 1.3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medgen_common.datalist import load_label_datalist
from medgen_common.runtime import select_device
from medgen_common.segmentation_utility import compare_training_sets, format_table, items_for_contrast
from medgen_common.writers import write_json
from tools import bundles as harness

TISSUES = ("csf", "gm", "wm")


def synthesise(
    label_bundle: Path, image_bundle: Path, dataset_dir: Path, out: Path, num_labels: int, contrasts: list[str],
    device: str, seed: int, overrides: dict | None = None,
) -> list[dict]:  # fmt: skip
    """Run label-LDM inference then SPADE inference (``overrides`` go to both); return datalist entries
    ``{"image", "label", "subject", "slice_index", "contrast"}`` of the synthetic pairs."""
    common = {**(overrides or {}), "dataset_dir": str(dataset_dir), "device_name": device, "seed": seed}
    for name, bundle, overrides in (
        ("labels", label_bundle, {"num_samples": num_labels, "output_dir": str(out / "labels")}),
        ("images", image_bundle, {
            "label_glob": str(out / "labels" / "*_label.nii.gz"), "num_samples": num_labels,
            "synthesis_contrasts": contrasts, "style_split": "training", "output_dir": str(out / "images"),
        }),
    ):  # fmt: skip
        manifest = harness.load_manifest(bundle)
        print(f"[pipeline] {name}: {bundle.name} inference (log: {out / 'logs' / (name + '.log')}) ...", flush=True)
        harness.run_workflow(
            bundle, harness.config_paths(bundle, manifest["inference"]["config_files"]), overrides=dict(common, **overrides),
            log_file=out / "logs" / f"{name}.log",
        )  # fmt: skip
    entries = []
    for index, label in enumerate(sorted((out / "labels").glob("*_label.nii.gz"))):
        stem = label.name.removesuffix("_label.nii.gz")
        for contrast in contrasts:
            image = out / "images" / f"{stem}_{contrast}.nii.gz"
            if not image.is_file():
                raise FileNotFoundError(f"SPADE inference wrote no image for label '{label}' in contrast {contrast}: '{image}'.")
            entries.append(
                {"image": str(image), "label": str(label), "subject": f"synthetic-{index:05d}", "slice_index": 0,
                 "contrast": contrast}
            )  # fmt: skip
    return entries


def downstream(
    dataset_dir: Path, synthetic: list[dict], real_contrast: str, test_contrast: str, channel_names: list[str],
    steps: int, seed: int, device: str,
) -> dict:  # fmt: skip
    """Train the segmenter on real slices of ``real_contrast``, on synthetic slices of ``test_contrast`` and on both,
    and test each on the real test subjects of ``test_contrast``. When the two contrasts differ (the OOD case), real
    slices of ``test_contrast`` are added as the upper bound. Lesions are merged into white matter (they sit in it)."""
    datalist = dataset_dir / "datalist_2d.json"

    def real(split: str, contrast: str) -> list[dict]:
        return items_for_contrast(load_label_datalist(datalist, split, channel_names, other_keys=[contrast]), contrast)

    real_train = real("training", real_contrast)
    synthetic = [entry for entry in synthetic if entry["contrast"] == test_contrast]
    sets = {
        f"real {real_contrast}": real_train,
        f"synthetic {test_contrast}": synthetic,
        f"real {real_contrast} + synthetic {test_contrast}": real_train + synthetic,
    }
    if real_contrast != test_contrast:
        sets[f"real {test_contrast} (upper bound)"] = real("training", test_contrast)
    class_channels = [channel_names.index(name) for name in ("background", *TISSUES)]
    merge_into = {index: channel_names.index("wm") for index in range(len(channel_names)) if index not in class_channels}
    return compare_training_sets(
        sets, real("test", test_contrast), class_channels, merge_into, class_names=["background", *TISSUES],
        reference=f"real {real_contrast}", steps=steps, seed=seed, device=device,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("demo"), help="output of tools.run_demo (default: demo)")
    parser.add_argument("--label-bundle", type=Path, help="trained brainspade_label_ldm (default: in --demo-dir)")
    parser.add_argument("--image-bundle", type=Path, help="trained spade_vaegan (default: in --demo-dir)")
    parser.add_argument("--dataset-dir", type=Path, help="folder of datalist_2d.json (default: spade_vaegan's demo data)")
    parser.add_argument("--out", type=Path, help="output folder (default: <demo-dir>/brainspade_pipeline)")
    parser.add_argument("--num-labels", type=int, default=400, help="synthetic label maps (default 400)")
    parser.add_argument("--contrast", default="t1", help="contrast of the in-distribution experiment (default t1)")
    parser.add_argument("--ood-contrast", default="flair", help="unseen contrast of the OOD experiment ('' to skip)")
    parser.add_argument("--steps", type=int, default=500, help="segmenter training steps per set (default 500)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="config override for both inference runs, e.g. num_inference_steps=20 (JSON values; repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        overrides = harness.parse_overrides(args.override)
    except ValueError as err:
        parser.error(str(err))
    demo = args.demo_dir.resolve()
    label_bundle = (args.label_bundle or demo / "brainspade_label_ldm" / "bundle").resolve()
    image_bundle = (args.image_bundle or demo / "spade_vaegan" / "bundle").resolve()
    dataset_dir = (args.dataset_dir or demo / "spade_vaegan" / "data" / "demo").resolve()
    out = (args.out or demo / "brainspade_pipeline").resolve()
    for name, path in (("label bundle", label_bundle / "models" / "model.pt"), ("image bundle", image_bundle / "models" / "model.pt"),
                       ("dataset", dataset_dir / "datalist_2d.json")):  # fmt: skip
        if not path.is_file():
            parser.error(f"{name} not ready: '{path}' does not exist (train the bundles first, e.g. make demo).")
    channel_names = json.loads((dataset_dir / "datalist_2d.json").read_text())["channels"]
    contrasts = [c for c in dict.fromkeys([args.contrast, args.ood_contrast]) if c]

    start = time.perf_counter()
    synthetic = synthesise(
        label_bundle, image_bundle, dataset_dir, out, args.num_labels, contrasts, args.device, args.seed, overrides
    )
    write_json({"training": synthetic, "channels": channel_names}, out / "datalist_synthetic.json")
    report = {"num_synthetic_labels": args.num_labels, "synthesis_s": time.perf_counter() - start}
    tables = []
    for case, contrast in (("in_distribution", args.contrast), ("out_of_distribution", args.ood_contrast)):
        if not contrast:
            continue
        print(f"[pipeline] downstream segmentation, {case} (tested on {contrast}) ...", flush=True)
        results = downstream(
            dataset_dir, synthetic, args.contrast, contrast, channel_names, args.steps, args.seed, select_device(args.device)
        )
        report[case] = {"test_contrast": contrast, **results}
        tables.append(f"### {case.replace('_', ' ')}: tested on real {contrast}\n\n{format_table(results)}")
    write_json(report, out / "downstream.json")
    (out / "downstream.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))
    print(f"[pipeline] dataset: {out / 'datalist_synthetic.json'}; report: {out / 'downstream.json'}")


if __name__ == "__main__":
    main()
