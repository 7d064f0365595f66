"""Write a synthetic demo dataset (NIfTI volumes, 2D slices and MONAI datalists) for one modality.

Example: ``python -m tools.make_demo_data --modality brain --out demo --n 40 --seed 0 --grid demo``.
Options left out take the generator's defaults (see ``medgen_common.demo_data``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medgen_common.demo_data import GENERATORS


def make_demo_data(modality: str, out_dir: str | Path, **options) -> dict[str, Path]:
    """Run the generator registered for ``modality``; return its datalist paths by "<grid>/<2d|3d>".

    Raises
    ------
    ValueError
        ``modality`` is not registered, or the generator rejects an option.
    """
    if modality not in GENERATORS:
        raise ValueError(f"unknown modality {modality!r}; choose from {sorted(GENERATORS)}.")
    return GENERATORS[modality](out_dir, **options)


def _count_files(datalist_path: Path) -> int:
    """Files a datalist names (those that exist, resolved against its folder), plus the datalist itself."""
    content = json.loads(datalist_path.read_text())
    names = {
        value
        for split in ("training", "validation", "test")
        for entry in content.get(split, [])
        for value in entry.values()
        if isinstance(value, str) and (datalist_path.parent / value).is_file()
    }
    return len(names) + 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_demo_data", description=__doc__)
    parser.add_argument("--modality", required=True, help=f"one of: {', '.join(sorted(GENERATORS))}")
    parser.add_argument("--out", required=True, type=Path, help="output folder; each grid gets OUT/<grid>/")
    optional = argparse.SUPPRESS  # absent options keep the generator's defaults
    parser.add_argument("--n", dest="n_subjects", type=int, default=optional, metavar="N", help="number of subjects")
    parser.add_argument("--seed", type=int, default=optional, help="dataset seed (>= 0)")
    parser.add_argument(
        "--grid", dest="grids", action="append", default=optional, metavar="NAME", help="output grid, repeatable"
    )
    parser.add_argument("--slices-per-subject", type=int, default=optional, metavar="K", help="2D slices per subject")
    for split in ("val", "test"):
        parser.add_argument(
            f"--{split}-fraction", type=float, default=optional, metavar="F", help=f"fraction of subjects in {split}"
        )
    options = vars(parser.parse_args(argv))
    modality, out_dir = options.pop("modality"), options.pop("out")

    start = time.perf_counter()
    try:
        datalists = make_demo_data(modality, out_dir, **options)
    except ValueError as error:
        parser.error(str(error))
    seconds = time.perf_counter() - start
    counts = {name: _count_files(path) for name, path in datalists.items()}
    print(f"{modality}: wrote {sum(counts.values())} files under {out_dir} in {seconds:.1f} s")
    for name, path in datalists.items():
        print(f"  {name}: {path} ({counts[name]} files)")


if __name__ == "__main__":
    main()
