"""Sampling cost of a trained bundle for each sampler and step count: NFE, GFLOPs, images/s and peak memory; or,
with ``--soak N``, whether memory stays flat over N consecutive inference calls of one image each.

    python -m tools.benchmark --bundle-dir demo/prostate_text_ldm/bundle --samplers ddim heun --steps 10 20 50 \
        [--images 8] [--device cpu] [--out benchmark.json] [--override key=value ...]
    python -m tools.benchmark --bundle-dir demo/brainspade_label_ldm/bundle --soak 1000 --samplers ddim --steps 10

The bundle's ``configs/workflows.json`` says how (its ``benchmark`` entry): which configs to merge (the demo override
last, as the demo ran), the config expression that makes ``num_samples`` images once (the bundle's own inference,
outputs written to a temporary folder), the id of its denoising network, whose calls are counted, and the config key
naming the sampler (``sampler_key``, default ``scheduler_name``). A Markdown
table for the bundle's README is printed and written next to the JSON.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from medgen_common.benchmark import benchmark_sampling, environment, soak
from medgen_common.writers import write_json, write_text
from tools import bundles as harness

COLUMNS = ("sampler", "steps", "nfe", "gflops_per_nfe", "gflops_per_image", "seconds_per_image", "images_per_second")


def benchmark_bundle(
    bundle_dir: Path,
    samplers: list[str],
    steps: list[int],
    images: int = 8,
    device: str = "cpu",
    overrides: dict | None = None,
    warmup: int = 1,
    repeats: int = 3,
) -> dict:
    """Benchmark the bundle's inference at every (sampler, steps); returns the rows and the environment."""
    bundle_dir = Path(bundle_dir).resolve()
    entry = _benchmark_entry(bundle_dir)
    rows = []
    with tempfile.TemporaryDirectory() as output_dir:
        for sampler in samplers:
            for num_steps in steps:
                sample, network = _sampling_call(
                    bundle_dir, entry, output_dir, sampler, num_steps, images, device, overrides
                )
                report = benchmark_sampling(sample, network, images, device, warmup, repeats)
                rows.append({"sampler": sampler, "steps": int(num_steps), **report})
                print(format_row(rows[-1]), flush=True)
    return {"bundle": bundle_dir.name, "environment": environment(device), "rows": rows}


def _benchmark_entry(bundle_dir: Path) -> dict:
    manifest = harness.load_manifest(bundle_dir)
    if "benchmark" not in manifest:
        raise ValueError(f"{bundle_dir.name} declares no 'benchmark' entry in configs/workflows.json.")
    return manifest["benchmark"]


def sampler_key(entry: dict) -> str:
    """The config key naming the sampler: ``scheduler_name`` unless the bundle's benchmark entry names another
    (``sampler_key``, e.g. the reconstruction ``solver`` of score_mri_recon)."""
    return entry.get("sampler_key", "scheduler_name")


def _sampling_call(bundle_dir, entry, output_dir, sampler, num_steps, images, device, overrides):
    """The bundle's own inference as a callable making ``images`` images, and its denoising network."""
    values = {
        "device_name": device, "output_dir": output_dir, sampler_key(entry): sampler,
        "num_inference_steps": int(num_steps), "num_samples": int(images), "batch_size": int(images),
        **entry.get("overrides", {}), **(overrides or {}), "benchmark_sample": entry["sample"],
    }  # fmt: skip
    config_files = harness.config_paths(bundle_dir, entry["config_files"])
    parsed = harness.parse_config_values(  # one parser: the sample function runs this network instance
        bundle_dir, config_files, ["initialize", entry["network"], "benchmark_sample"], values
    )
    return parsed["benchmark_sample"], parsed[entry["network"]]


def soak_bundle(
    bundle_dir: Path,
    calls: int,
    warmup_calls: int,
    sampler: str,
    num_steps: int,
    device: str = "cpu",
    overrides: dict | None = None,
) -> dict:
    """Run the bundle's inference on one image ``calls`` times in a row; see :func:`medgen_common.benchmark.soak`."""
    bundle_dir = Path(bundle_dir).resolve()
    entry = _benchmark_entry(bundle_dir)
    with tempfile.TemporaryDirectory() as output_dir:
        sample, _ = _sampling_call(bundle_dir, entry, output_dir, sampler, num_steps, 1, device, overrides)
        report = soak(sample, calls, warmup_calls)
    return {"bundle": bundle_dir.name, "sampler": sampler, "steps": int(num_steps), "environment": environment(device),
            **report}  # fmt: skip


def soak_summary(result: dict) -> str:
    """The README sentence of a :func:`soak_bundle` result."""
    env = result["environment"]
    return (
        f"Soak ({result['bundle']}, {result['sampler']} {result['steps']} steps, one image per call): "
        f"{result['calls']} consecutive inference calls in {result['seconds'] / 60:.1f} min; peak resident memory "
        f"{result['peak_rss_warmup_mb']:.0f} MiB over the first {result['warmup_calls']} calls and "
        f"{result['peak_rss_after_warmup_mb']:.0f} MiB over the remaining {result['calls'] - result['warmup_calls']} "
        f"(growth {result['peak_rss_growth_percent']:+.2f} %); {env['device_name']}, torch {env['torch']}."
    )


def format_row(row: dict) -> str:
    cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def markdown_table(result: dict) -> str:
    """The README table of a :func:`benchmark_bundle` result, with what it ran on."""
    env = result["environment"]
    header = ["sampler", "steps", "NFE", "GFLOPs/NFE", "GFLOPs/image", "s/image", "images/s"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(format_row(row) for row in result["rows"]),
        "",
        f"{env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch {env['torch']}, "
        f"MONAI {env['monai']}; {result['rows'][0]['images_per_call']} images per call, the bundle's whole "
        "inference (decoder and file writing included), median of the timed runs.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle-dir", type=Path, required=True, help="a trained bundle (e.g. demo/<bundle>/bundle)")
    parser.add_argument("--samplers", nargs="+", default=["ddim"], help="scheduler names of make_scheduler")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50])
    parser.add_argument("--images", type=int, default=8, help="images per sampling call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--soak", type=int, default=0, metavar="N", help="instead: N inference calls in a row")
    parser.add_argument("--soak-warmup", type=int, default=100, help="calls before the memory baseline")
    args = parser.parse_args(argv)
    if args.soak:
        result = soak_bundle(
            args.bundle_dir, args.soak, args.soak_warmup, args.samplers[0], args.steps[0], args.device,
            harness.parse_overrides(args.override),
        )  # fmt: skip
        write_json(result, args.out)
        write_text(soak_summary(result) + "\n", args.out.with_suffix(".md"))
        print(soak_summary(result))
        return
    result = benchmark_bundle(
        args.bundle_dir, args.samplers, args.steps, args.images, args.device,
        harness.parse_overrides(args.override), args.warmup, args.repeats,
    )  # fmt: skip
    write_json(result, args.out)
    table = markdown_table(result)
    write_text(table + "\n", args.out.with_suffix(".md"))
    print(table)


if __name__ == "__main__":
    main()
