"""Quality against cost for a trained diffusion bundle: its own evaluation at each step count, and images/s there.

    python -m tools.nfe_sweep --bundle-dir demo/brainspade_label_ldm/bundle --sampler ddim --steps 10 20 50 100 200 \
        [--reference-sampler ddpm --reference-steps 1000] [--out folder] [--override dataset_dir=demo/... ...]

For every step count the bundle's ``evaluate`` workflow runs with ``scheduler_name`` and ``num_inference_steps``
overridden (same seed), and the domain metrics its ``workflows.json`` names (``nfe_sweep.metrics``: label -> path in
the evaluation report, ``#``-separated) are read from the report; ``tools.benchmark`` times the bundle's inference
at the same setting. Each metric is compared with its value under the reference sampler (DDPM on the 1000-step
training grid by default), as EDM-Lx's Figs. 3-4 plot quality against NFE and images/s. The JSON and a Markdown
table for the bundle's README are written to the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medgen_common.writers import write_json, write_text
from tools import benchmark
from tools import bundles as harness


def _evaluate(bundle_dir, manifest, configs, sampler, num_steps, out_dir, overrides, images) -> dict:
    """One row: the evaluation report's metrics and the inference cost at (sampler, steps)."""
    output_dir = out_dir / f"{sampler}_{num_steps}"
    values = {"scheduler_name": sampler, "num_inference_steps": num_steps, "output_dir": str(output_dir),
              **(overrides or {})}  # fmt: skip
    started = time.perf_counter()
    harness.run_workflow(bundle_dir, configs, overrides=values, log_file=output_dir / "evaluate.log")
    seconds = time.perf_counter() - started
    report = json.loads((output_dir / manifest["evaluate"]["report"]).read_text())
    cost = benchmark.benchmark_bundle(bundle_dir, [sampler], [num_steps], images, "cpu", overrides, 1, 1)["rows"][0]
    metrics = {label: float(harness.value_at(report, path)) for label, path in manifest["nfe_sweep"]["metrics"].items()}
    return {"sampler": sampler, "steps": num_steps, "nfe": cost["nfe"], "images_per_second": cost["images_per_second"],
            "evaluation_seconds": seconds, "metrics": metrics}  # fmt: skip


def sweep(
    bundle_dir: Path,
    sampler: str,
    steps: list[int],
    reference_sampler: str = "ddpm",
    reference_steps: int = 1000,
    out_dir: Path | None = None,
    overrides: dict | None = None,
    images: int = 8,
) -> dict:
    """Evaluate and time the bundle at each step count and at the reference; returns the rows (reference first) with
    each metric's relative change from the reference."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = harness.load_manifest(bundle_dir)
    if "nfe_sweep" not in manifest:
        raise ValueError(f"{bundle_dir.name} declares no 'nfe_sweep' metrics in configs/workflows.json.")
    out_dir = Path(out_dir or bundle_dir / "nfe_sweep").resolve()
    configs = harness.config_paths(bundle_dir, manifest["evaluate"]["config_files"])
    settings = [(reference_sampler, reference_steps)] + [(sampler, num_steps) for num_steps in sorted(steps)]
    rows = []
    for row_sampler, num_steps in settings:
        rows.append(_evaluate(bundle_dir, manifest, configs, row_sampler, num_steps, out_dir, overrides, images))
        reference = rows[0]["metrics"]
        rows[-1]["relative_change"] = {
            label: abs(value - reference[label]) / abs(reference[label]) if reference[label] else float("nan")
            for label, value in rows[-1]["metrics"].items()
        }
        print(format_row(rows[-1]), flush=True)
    result = {"bundle": bundle_dir.name, "rows": rows, "environment": benchmark.environment("cpu")}
    write_json(result, out_dir / "nfe_sweep.json")
    write_text(markdown_table(result) + "\n", out_dir / "nfe_sweep.md")
    return result


def format_row(row: dict) -> str:
    cells = [row["sampler"], str(row["steps"]), str(row["nfe"]), f"{row['images_per_second']:.3g}"]
    cells += [f"{value:.4g}" for value in row["metrics"].values()]
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
        f"Same seed in every row; images/s of the bundle's inference on {env['device_name']} "
        f"({env['torch_threads']} threads), torch {env['torch']}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle-dir", type=Path, required=True)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50, 100, 200])
    parser.add_argument("--reference-sampler", default="ddpm")
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=8, help="images per timed inference call")
    parser.add_argument("--out", type=Path, default=None, help="folder (default <bundle>/nfe_sweep)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    result = sweep(args.bundle_dir, args.sampler, args.steps, args.reference_sampler, args.reference_steps, args.out,
                   harness.parse_overrides(args.override), args.images)  # fmt: skip
    print(markdown_table(result))


if __name__ == "__main__":
    main()
