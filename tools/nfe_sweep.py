"""Quality against cost for a trained diffusion bundle: its own evaluation at each step count, and images/s there.

    python -m tools.nfe_sweep --bundle-dir demo/brainspade_label_ldm/bundle --sampler ddim [dpmpp_2m ...] \
        --steps 10 20 50 100 200 [--reference-sampler ddpm --reference-steps 1000 | --reference-from old/nfe_sweep.json] \
        [--seeds 0 1 2 3] [--out folder] [--override dataset_dir=demo/... ...]

For every sampler and step count the bundle's ``evaluate`` workflow runs with its sampler (``scheduler_name``, or the
key its benchmark entry names) and ``num_inference_steps`` overridden (same seed; plus the bundle's own ``nfe_sweep.overrides``, e.g. fewer guidance settings), and the domain
metrics its ``workflows.json`` names (``nfe_sweep.metrics``: label -> path in the evaluation report,
``#``-separated, ``{sampler}`` standing for the row's sampler) are read from the report; ``tools.benchmark`` times the bundle's inference
at the same setting. Each metric is compared with its value under the reference sampler (DDPM on the 1000-step
training grid by default; ``--reference-from`` reuses the reference row of an earlier sweep of the same bundle
instead of paying for it again), as EDM-Lx's Figs. 3-4 plot quality against NFE and images/s. The JSON and a
Markdown table for the bundle's README are written to the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser

from medgen_common.writers import write_json, write_text
from tools import benchmark
from tools import bundles as harness


def _evaluate(bundle_dir, manifest, configs, sampler, num_steps, out_dir, overrides, images, seeds=(None,)) -> dict:
    """One row: the evaluation report's metrics (the mean over ``seeds``, each run with its own ``seed``) and the
    inference cost at (sampler, steps)."""
    per_seed, seconds = [], 0.0
    for seed in seeds:
        output_dir = out_dir / (f"{sampler}_{num_steps}" + ("" if seed is None else f"_seed{seed}"))
        values = {benchmark.sampler_key(manifest["benchmark"]): sampler, "num_inference_steps": num_steps, "output_dir": str(output_dir),
                  **manifest["nfe_sweep"].get("overrides", {}), **(overrides or {}),
                  **({} if seed is None else {"seed": seed})}  # fmt: skip
        started = time.perf_counter()
        harness.run_workflow(bundle_dir, configs, overrides=values, log_file=output_dir / "evaluate.log")
        seconds += time.perf_counter() - started
        report = json.loads((output_dir / manifest["evaluate"]["report"]).read_text())
        per_seed.append(metric_values(report, manifest, sampler))
    cost = benchmark.benchmark_bundle(bundle_dir, [sampler], [num_steps], images, "cpu", overrides, 1, 1)["rows"][0]
    row = {"sampler": sampler, "steps": num_steps, "nfe": cost["nfe"], "images_per_second": cost["images_per_second"],
           "evaluation_seconds": seconds, "metrics": {label: float(np.mean([m[label] for m in per_seed])) for label in per_seed[0]}}  # fmt: skip
    if seeds != (None,):
        row["seeds"] = list(seeds)
        row["metrics_per_seed"] = per_seed
        row["metrics_sd"] = {label: float(np.std([m[label] for m in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
                             for label in per_seed[0]}  # fmt: skip
    return row


def metric_values(report: dict, manifest: dict, sampler: str) -> dict[str, float]:
    """The domain metrics ``nfe_sweep.metrics`` names, read from an evaluation ``report`` of ``sampler``."""
    paths = manifest["nfe_sweep"]["metrics"]
    return {label: float(harness.value_at(report, path.replace("{sampler}", sampler))) for label, path in paths.items()}


def _check_seed_key(configs: list[str]) -> None:
    """Seeds are passed as the config key ``seed``; a bundle without one would give the same samples every time."""
    parser = ConfigParser()
    parser.read_config(configs)
    if "seed" not in parser:
        raise ValueError("--seeds needs a 'seed' key in the bundle's evaluation configs; it has none.")


def sweep(
    bundle_dir: Path,
    samplers: list[str],
    steps: list[int],
    reference_sampler: str = "ddpm",
    reference_steps: int = 1000,
    out_dir: Path | None = None,
    overrides: dict | None = None,
    images: int = 8,
    reference_row: dict | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """Evaluate and time the bundle at each (sampler, step count) and at the reference; returns the rows (reference
    first) with each metric's relative change from the reference. ``reference_row`` (a row of an earlier sweep's
    JSON) is used as the reference instead of evaluating it again. With ``seeds`` every sweep row is the mean over
    one evaluation per seed (the reference is evaluated once, at the configured seed), which separates the change
    due to fewer steps from the seed-to-seed spread of the metric."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = harness.load_manifest(bundle_dir)
    if "nfe_sweep" not in manifest:
        raise ValueError(f"{bundle_dir.name} declares no 'nfe_sweep' metrics in configs/workflows.json.")
    out_dir = Path(out_dir or bundle_dir / "nfe_sweep").resolve()
    configs = harness.config_paths(bundle_dir, manifest["evaluate"]["config_files"])
    if seeds:
        _check_seed_key(configs)
    if reference_row is None:
        reference_row = _evaluate(
            bundle_dir, manifest, configs, reference_sampler, reference_steps, out_dir, overrides, images
        )
    missing = set(manifest["nfe_sweep"]["metrics"]) - set(reference_row["metrics"])
    if missing:
        raise ValueError(f"the reference row lacks the metrics {sorted(missing)} that {bundle_dir.name} declares.")
    rows = [{**reference_row, "relative_change": {label: 0.0 for label in reference_row["metrics"]}}]
    print(format_row(rows[0]), flush=True)
    reference = reference_row["metrics"]
    for sampler in samplers:
        for num_steps in sorted(steps):
            row = _evaluate(bundle_dir, manifest, configs, sampler, num_steps, out_dir, overrides, images,
                            tuple(seeds) if seeds else (None,))  # fmt: skip
            row["relative_change"] = {
                label: abs(value - reference[label]) / abs(reference[label]) if reference[label] else float("nan")
                for label, value in row["metrics"].items()
            }
            rows.append(row)
            print(format_row(row), flush=True)
    result = {"bundle": bundle_dir.name, "rows": rows, "environment": benchmark.environment("cpu")}
    write_json(result, out_dir / "nfe_sweep.json")
    write_text(markdown_table(result) + "\n", out_dir / "nfe_sweep.md")
    return result


def format_row(row: dict) -> str:
    cells = [row["sampler"], str(row["steps"]), str(row["nfe"]), f"{row['images_per_second']:.3g}"]
    sd = row.get("metrics_sd", {})
    cells += [
        f"{value:.4g}" + (f" ± {sd[label]:.2g}" if label in sd else "") for label, value in row["metrics"].items()
    ]
    cells.append(f"{100 * max(row['relative_change'].values()):.1f} %")
    return "| " + " | ".join(cells) + " |"


def markdown_table(result: dict) -> str:
    reference = result["rows"][0]
    header = ["sampler", "steps", "NFE", "images/s", *reference["metrics"],
              f"largest change from {reference['sampler']} {reference['steps']}"]  # fmt: skip
    env = result["environment"]
    return "\n".join([
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(format_row(row) for row in result["rows"]),
        "",
        ("Metrics of a row with seeds are the mean ± SD over one evaluation per seed "
         f"({', '.join(str(s) for s in seeds)}); " if (seeds := result["rows"][-1].get("seeds")) else "Same seed in every row; ")
        + f"images/s of the bundle's inference on {env['device_name']} "
        f"({env['torch_threads']} threads), torch {env['torch']}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle-dir", type=Path, required=True)
    parser.add_argument("--sampler", nargs="+", default=["ddim"], help="one or more samplers")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50, 100, 200])
    parser.add_argument("--reference-sampler", default="ddpm")
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument(
        "--reference-from", type=Path, default=None, help="an earlier nfe_sweep.json: reuse its reference"
    )
    parser.add_argument("--images", type=int, default=8, help="images per timed inference call")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="average each sweep row over these seeds")
    parser.add_argument("--out", type=Path, default=None, help="folder (default <bundle>/nfe_sweep)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    reference_row = json.loads(args.reference_from.read_text())["rows"][0] if args.reference_from else None
    result = sweep(args.bundle_dir, args.sampler, args.steps, args.reference_sampler, args.reference_steps, args.out,
                   harness.parse_overrides(args.override), args.images, reference_row, args.seeds)  # fmt: skip
    print(markdown_table(result))


if __name__ == "__main__":
    main()
