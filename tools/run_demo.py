"""The main demo job: for every bundle, generate its demo data, train each stage at demo scale, sample, evaluate,
and write a short report of what was measured.

    python -m tools.run_demo --out demo [--bundles brainspade_label_ldm] [--subjects 40] [--device cpu] \
        [--override epochs=5 ...]

Each bundle is copied to ``OUT/<bundle>/bundle`` so weights and outputs never land in the repository. Bundles run
one after the other (never two trainings at once); the brainSPADE pipeline comes first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from tools import brainspade_pipeline
from tools import bundles as harness

# the brainSPADE pipeline first (labels, then images), then the others in the order of the README's table
BUNDLE_ORDER = [
    "brainspade_label_ldm",
    "spade_vaegan",
    "msk_csg",
    "prostate_text_ldm",
    "virtual_elastography_gan",
    "score_mri_recon",
    "edge_guided_ldm",
]


def _ordered(bundle_roots: list[Path]) -> list[Path]:
    rank = {name: index for index, name in enumerate(BUNDLE_ORDER)}
    return sorted(bundle_roots, key=lambda root: (rank.get(root.name, len(rank)), root.name))


def _summarise(value, depth: int = 0) -> list[str]:
    """Markdown bullet lines of a (nested) report dict, floats with 3 significant digits."""
    lines = []
    for key, item in value.items():
        indent = "  " * depth
        if isinstance(item, dict):
            lines.append(f"{indent}- {key}:")
            lines.extend(_summarise(item, depth + 1))
        else:
            text = f"{item:.3g}" if isinstance(item, float) else str(item)
            lines.append(f"{indent}- {key}: {text}")
    return lines


def run_bundle(
    source: Path, out_dir: Path, subjects: int | None, device: str, seed: int, overrides: dict | None = None
) -> dict:
    """Demo data, training stages, inference and evaluation of one bundle; returns timings and the report."""
    manifest = harness.load_manifest(source)
    work = out_dir / source.name
    bundle_root = work / "bundle"
    shutil.rmtree(bundle_root, ignore_errors=True)
    shutil.copytree(source, bundle_root, ignore=shutil.ignore_patterns("models", "eval", "output"))
    timings = {}

    def timed_run(name: str, config_files: list[str], run_id: str = "run", **overrides) -> None:
        print(f"[{source.name}] {name} (log: {work / 'logs' / (name + '.log')}) ...", flush=True)
        start = time.perf_counter()
        harness.run_workflow(
            bundle_root, harness.config_paths(bundle_root, config_files), run_id=run_id,
            overrides=dict(common, **overrides), log_file=work / "logs" / f"{name}.log",
        )  # fmt: skip
        timings[f"{name}_s"] = time.perf_counter() - start

    start = time.perf_counter()
    dataset_dir = harness.make_demo_dataset(manifest["demo_data"], work / "data", num_subjects=subjects, seed=seed)
    timings["demo_data_s"] = time.perf_counter() - start
    common = {"dataset_dir": str(dataset_dir), "device_name": device, "seed": seed, **(overrides or {})}
    for stage in manifest["training"]:
        timed_run(f"train_{stage['name']}", stage["config_files"], run_id="training")
    timed_run("inference", manifest["inference"]["config_files"], output_dir=str(work / "samples"))
    timed_run("evaluate", manifest["evaluate"]["config_files"], output_dir=str(work / "evaluation"))
    report = json.loads((work / "evaluation" / manifest["evaluate"]["report"]).read_text())
    return {"timings": timings, "report": report, "work": work, "manifest": manifest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo)")
    parser.add_argument("--bundles", nargs="*", help="bundle names (default: every bundle)")
    parser.add_argument("--subjects", type=int, default=None, help="demo subjects (default: each bundle's manifest)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="config override passed to every workflow, e.g. epochs=5 (JSON values; repeatable)",
    )  # fmt: skip
    parser.add_argument("--pipeline-labels", type=int, default=400, help="synthetic labels of the brainSPADE pipeline")
    parser.add_argument("--pipeline-steps", type=int, default=500, help="segmenter steps of the brainSPADE pipeline")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    try:
        overrides = harness.parse_overrides(args.override)
    except ValueError as err:
        parser.error(str(err))

    available = {root.name: root for root in harness.discover_bundles()}
    names = args.bundles or list(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        parser.error(f"unknown bundle(s) {unknown}; available: {sorted(available)}")
    args.out.mkdir(parents=True, exist_ok=True)

    lines = ["# medgen-bundles demo report", "", f"Device: {args.device}; seed {args.seed}.", ""]
    for root in _ordered([available[name] for name in names]):
        result = run_bundle(root, args.out, args.subjects, args.device, args.seed, overrides)
        work = result["work"]
        lines += [f"## {root.name}", "", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()), ""]
        lines += [f"Samples: `{(work / 'samples').relative_to(args.out)}` (NIfTI + `{result['manifest']['inference']['preview']}`)", ""]
        lines += ["Evaluation:", ""] + _summarise(result["report"]) + [""]
        (args.out / "report.md").write_text("\n".join(lines))  # rewritten after each bundle: partial runs still report
    if {"brainspade_label_ldm", "spade_vaegan"} <= set(names):
        lines += ["## brainSPADE pipeline: labels, then images, then a segmenter trained on them", ""]
        start = time.perf_counter()
        brainspade_pipeline.main(
            ["--demo-dir", str(args.out), "--device", args.device, "--seed", str(args.seed), "--num-labels",
             str(args.pipeline_labels), "--steps", str(args.pipeline_steps)]
            + [f"--override={pair}" for pair in args.override]
        )  # fmt: skip
        table = (args.out / "brainspade_pipeline" / "downstream.md").read_text()
        lines += [f"`python -m tools.brainspade_pipeline --demo-dir {args.out.name}` ({time.perf_counter() - start:.0f} s)", "", table]
        (args.out / "report.md").write_text("\n".join(lines))
    print(f"report written to {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
