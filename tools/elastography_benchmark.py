"""Seeds, ablations and the negative control of the virtual_elastography_gan bundle, measured the same way.

    python -m tools.elastography_benchmark --out bench [--seeds 0 1 2] [--variants full plain_l1 no_tumour_d decoupled]

Generates the demo data once (the coupled set and its decoupled negative control, same cases), then for every
variant and seed trains the bundle at demo scale and runs its ``evaluate`` workflow on the held-out cases. Writes
``OUT/results.json`` (every summary) and ``OUT/results.md`` (mean +- SD over seeds). Runs one training at a time.

Variants are one override each: ``plain_l1`` sets ``use_colour_prior`` false, ``no_tumour_d`` sets
``use_tumour_discriminator`` false, and ``decoupled`` trains and tests on the set whose B-mode cues are drawn
independently of stiffness.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from medgen_common.writers import write_json, write_text
from tools import bundles as harness

BUNDLE = harness.BUNDLES_DIR / "virtual_elastography_gan"
VARIANTS = {
    "full": ({}, "demo"),
    "plain_l1": ({"use_colour_prior": False}, "demo"),
    "no_tumour_d": ({"use_tumour_discriminator": False}, "demo"),
    "decoupled": ({}, "demo_decoupled"),
}
# summary keys shown in the table, in order
COLUMNS = (
    "sr_auc_virtual", "sr_auc_real", "sr_spearman", "sign_accuracy", "sr_mape", "lesion_index_mae", "image_index_mae",
    "ssim", "chc",
)  # fmt: skip


def run_variant(name: str, seed: int, data_root: Path, out_dir: Path, overrides: dict) -> dict:
    """Train and evaluate one variant with one seed in ``out_dir/<name>_seed<seed>``; return its summary."""
    variant_overrides, dataset = VARIANTS[name]
    work = out_dir / f"{name}_seed{seed}"
    bundle_root = work / "bundle"
    shutil.rmtree(bundle_root, ignore_errors=True)
    shutil.copytree(BUNDLE, bundle_root, ignore=shutil.ignore_patterns("models", "eval", "output"))
    manifest = harness.load_manifest(BUNDLE)
    common = {"dataset_dir": str(data_root / dataset), "device_name": "cpu", "seed": seed, **variant_overrides, **overrides}
    start = time.perf_counter()
    for stage in manifest["training"]:
        harness.run_workflow(
            bundle_root, harness.config_paths(bundle_root, stage["config_files"]), run_id="training", overrides=common,
            log_file=work / f"train_{stage['name']}.log",
        )  # fmt: skip
    train_seconds = time.perf_counter() - start
    harness.run_workflow(
        bundle_root, harness.config_paths(bundle_root, manifest["evaluate"]["config_files"]),
        overrides=dict(common, output_dir=str(work / "evaluation")), log_file=work / "evaluate.log",
    )  # fmt: skip
    summary = json.loads((work / "evaluation" / manifest["evaluate"]["report"]).read_text())
    return {"variant": name, "seed": seed, "train_seconds": train_seconds, "summary": summary}


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def results_table(results: list[dict]) -> str:
    """Markdown table: one row per variant, mean +- SD over seeds of each summary column."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    lines = ["| variant | seeds | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 2)]
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant]
        cells = [_cell([float(r["summary"][c]) for r in runs if r["summary"].get(c) is not None]) for c in COLUMNS]
        lines.append(f"| {variant} | {','.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cases", type=int, default=None, help="demo cases (default: the bundle manifest's)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the demo data (the same for every run)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = parser.parse_args(argv)
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = harness.parse_overrides(args.override)

    manifest = harness.load_manifest(BUNDLE)
    data_root = harness.make_demo_dataset(manifest["demo_data"], out_dir / "data", args.cases, args.data_seed).parent
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            print(f"[elastography benchmark] {variant}, seed {seed} ...", flush=True)
            results.append(run_variant(variant, seed, data_root, out_dir, overrides))
            write_json(results, out_dir / "results.json")
            write_text(results_table(results), out_dir / "results.md")
    print(results_table(results))


if __name__ == "__main__":
    main()
