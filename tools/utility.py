"""Does a bundle's synthetic data help a downstream model? One command per task, for every bundle.

    python -m tools.utility segmentation --real data/datalist_2d.json:training --test data/datalist_2d.json:test \
        --synthetic output/datalist_synthetic.json --classes 0 1 2 --merge-into 0 --class-names background a b \
        [--label-format index --normalisation zscore --per-image --slice-key frame] \
        [--concat 1.0 ...] [--replace 0.5 ...] [--patch-mix 0.5:16 ...] [--pair-key label] \
        [--augment mirror rotate ...] [--architecture attention_unet] [--where task=breast_us] --out utility
    python -m tools.utility segmentation --real data/datalist_2d.json:training --folds 3 --group-key subject ...
    python -m tools.utility classification --real data/datalist_2d.json:training --test data/datalist_2d.json:test \
        --synthetic output/datalist_synthetic.json --image-key t2w --label-key lesion_present --group-key case \
        [--concat 1.0 ...] [--replace 0.5 ...] --out utility

A datalist is ``PATH[:SPLIT]`` (split ``training`` by default); relative file paths resolve against its folder.
Every run trains the same network with the same seed and steps on ``real``, ``synthetic`` and each mixture asked
for, and scores them all on the same real test patients:

- ``--concat R``: all real items plus ``R`` x as many synthetic ones; ``--replace R``: a fraction ``R`` of the real
  items swapped for synthetic ones (the size unchanged); for classification the synthetic items drawn keep the real
  set's class histogram (MediSyn's class matching), and ``synthetic`` has the real set's size and histogram when
  there are enough synthetic items;
- ``--patch-mix ALPHA:P`` (segmentation): EMIT-Diff's patch mixing: each real image is mixed patch-wise (P x P
  pixels, real with probability ALPHA) with a synthetic image generated from its own label; a synthetic item is a
  real item's counterpart when their ``--pair-key`` values (the label file by default) are the same file;
- ``--augment NAME ...`` (segmentation): one arm per traditional augmentation (EMIT-Diff's baselines: contrast,
  gamma, brightness, noise, resolution, mirror, rotate, scale), trained on the real items.

``--folds K`` (segmentation) replaces ``--test`` by a K-fold cross-validation of ``--real`` split by patient
(``--group-key``): each fold trains every arm on the other folds' items and the synthetic items generated from them,
and tests on its own; every patient is tested once and the CIs run over all of them. ``--where KEY=VALUE`` keeps the
entries of one task of a shared datalist.

Segmentation reports Dice, precision, recall, HD95 and ASSD per class and their class means with patient-level
bootstrap CIs (:mod:`medgen_common.segmentation_utility`); classification reports accuracy, macro-AUROC and ΔAUROC with
patient-level bootstrap CIs (:mod:`medgen_common.classification_utility`). ``utility.json`` and ``utility.md`` are
written to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from medgen_common.classification_utility import compare_classification_sets, format_classification_table
from medgen_common.datalist import load_datalist
from medgen_common.downstream_statistics import class_matched_indices, mix_training_items, patient_folds
from medgen_common.runtime import configure_threads
from medgen_common.segmentation_utility import (
    ARCHITECTURES,
    TRADITIONAL_AUGMENTATIONS,
    combine_folds,
    compare_training_sets,
    format_summary_table,
    format_table,
)
from medgen_common.writers import write_json, write_text


def read_items(spec: str, keys: list[str]) -> list[dict]:
    """Entries of ``PATH[:SPLIT]`` with the files under ``keys`` resolved."""
    path, _, split = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    return load_datalist(path, split or "training", keys)


def _arm_name(mode: str, ratio: float) -> str:
    return f"real+synthetic (concat {ratio:g})" if mode == "concat" else f"real/synthetic (replace {ratio:g})"


def _pair(item: dict, key: str) -> str:
    """What pairs a synthetic item with the real item it was generated from: the real path of its ``key`` file."""
    return os.path.realpath(item[key])


def _segmentation_arms(real: list[dict], synthetic: list[dict], args) -> tuple[dict, dict, dict]:
    """``(training sets, patch mixing, augmentations)`` of one comparison, real items first."""
    train_sets = {"real": real, "synthetic": synthetic}
    for mode, ratios in (("concat", args.concat), ("replace", args.replace)):
        for ratio in ratios:
            train_sets[_arm_name(mode, ratio)] = mix_training_items(real, synthetic, mode, ratio, args.seed)
    augmentations = {f"real, {name} augmentation": name for name in args.augment}
    train_sets.update(dict.fromkeys(augmentations, real))
    patch_mixing = {}
    if args.patch_mix:
        counterparts: dict[str, list] = {}
        for item in synthetic:
            counterparts.setdefault(_pair(item, args.pair_key), []).append(item["image"])
        paired = [{**item, "synthetic_images": counterparts.get(_pair(item, args.pair_key), [])} for item in real]
        unpaired = [item[args.pair_key] for item in paired if not item["synthetic_images"]]
        if unpaired:
            raise ValueError(
                f"patch mixing needs a synthetic counterpart of every real item; {len(unpaired)} of {len(real)} have "
                f"none with the same '{args.pair_key}' (first: {unpaired[0]}). Generate one per real label."
            )
        for spec in args.patch_mix:
            alpha, _, patch_size = spec.partition(":")
            name = f"patch mix (α {float(alpha):g}, p {int(patch_size)})"
            train_sets[name], patch_mixing[name] = paired, {"alpha": float(alpha), "patch_size": int(patch_size)}
    return train_sets, patch_mixing, augmentations


def _where(items: list[dict], conditions: list[str], source: str) -> list[dict]:
    """The items whose ``KEY`` equals ``VALUE`` for every ``KEY=VALUE`` condition."""
    for condition in conditions:
        key, _, value = condition.partition("=")
        items = [item for item in items if str(item.get(key)) == value]
    if not items:
        raise ValueError(f"no entry of {source} matches {conditions}.")
    return items


def segmentation(args) -> dict:
    keys = [args.image_key, args.label_key]
    real = _where(read_items(args.real, keys), args.where, args.real)
    synthetic = _where(
        read_items(args.synthetic, [args.synthetic_image_key, args.label_key]), args.where, args.synthetic
    )
    synthetic = [{**item, "image": item[args.synthetic_image_key]} for item in synthetic]
    test = [] if args.folds else _where(read_items(args.test, keys), args.where, args.test)
    if args.slice_key:
        real, test = ([{**item, "slice_index": item[args.slice_key]} for item in items] for items in (real, test))
    real, test = ([{**item, "image": item[args.image_key]} for item in items] for items in (real, test))
    settings = dict(
        class_names=args.class_names, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, channels=args.channels, progress=True, label_format=args.label_format,
        normalisation=args.normalisation, per_image=args.per_image, architecture=args.architecture,
    )  # fmt: skip

    def compare(train_real: list[dict], train_synthetic: list[dict], test_items: list[dict]) -> dict:
        train_sets, patch_mixing, augmentations = _segmentation_arms(train_real, train_synthetic, args)
        return compare_training_sets(
            train_sets, test_items, args.classes, args.merge_into, patch_mixing=patch_mixing,
            augmentations=augmentations, **settings,
        )  # fmt: skip

    if not args.folds:
        results = compare(real, synthetic, test)
    else:  # the synthetic items of a fold are those generated from its training items
        missing = [index for index, item in enumerate(real) if args.group_key not in item]
        if missing:
            raise ValueError(
                f"--folds splits by '{args.group_key}', which {len(missing)} entries of {args.real} lack (first: "
                f"entry {missing[0]}); name the patient key with --group-key."
            )
        folds = patient_folds([item[args.group_key] for item in real], args.folds, args.seed)
        fold_results = []
        for index, held_out in enumerate(folds):
            print(f"fold {index + 1}/{len(folds)}: {len(held_out)} test items")
            held = set(held_out)
            train_real = [item for i, item in enumerate(real) if i not in held]
            sources = {_pair(item, args.pair_key) for item in train_real}
            train_synthetic = [item for item in synthetic if _pair(item, args.pair_key) in sources]
            fold_results.append(compare(train_real, train_synthetic, [real[i] for i in held_out]))
        results = combine_folds(fold_results, seed=args.seed)
    tables = [format_summary_table(results, seed=args.seed), "", format_table(results)]
    return {"results": results, "markdown": "\n".join(tables)}


def _labels(items: list[dict], key: str, source: str) -> list[int]:
    missing = [index for index, item in enumerate(items) if key not in item]
    if missing:
        raise ValueError(f"{len(missing)} entries of {source} have no '{key}' (first: entry {missing[0]}).")
    return [int(item[key]) for item in items]


def classification(args) -> dict:
    real, test = read_items(args.real, [args.image_key]), read_items(args.test, [args.image_key])
    synthetic = read_items(args.synthetic, [args.synthetic_image_key])
    synthetic = [{**item, args.image_key: item[args.synthetic_image_key]} for item in synthetic]
    real_labels, synthetic_labels = (
        _labels(items, args.label_key, name) for items, name in ((real, args.real), (synthetic, args.synthetic))
    )
    histogram = {int(c): int(n) for c, n in zip(*np.unique(real_labels, return_counts=True))}

    def matched(labels: list[int], counts: dict[int, int], items: list[dict]) -> list[dict]:
        return [items[i] for i in class_matched_indices(labels, counts, args.seed)]

    try:  # the real set's size and class histogram
        train_sets = {"real": real, "synthetic": matched(synthetic_labels, histogram, synthetic)}
    except ValueError:  # fewer synthetic items than real ones in some class: all of them, as generated
        train_sets = {"real": real, "synthetic": synthetic}
    for ratio in args.concat:
        added = {c: round(ratio * n) for c, n in histogram.items()}
        train_sets[_arm_name("concat", ratio)] = [*real, *matched(synthetic_labels, added, synthetic)]
    for ratio in args.replace:
        swapped = {c: round(ratio * n) for c, n in histogram.items()}
        kept = matched(real_labels, {c: n - swapped[c] for c, n in histogram.items()}, real)
        train_sets[_arm_name("replace", ratio)] = [*kept, *matched(synthetic_labels, swapped, synthetic)]
    results = compare_classification_sets(
        train_sets, test, args.image_key, args.label_key, args.group_key, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, channels=args.channels,
        normalisation=args.normalisation, progress=True,
    )  # fmt: skip
    return {"results": results, "markdown": format_classification_table(results)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    for task in ("segmentation", "classification"):
        sub = tasks.add_parser(task)
        sub.add_argument("--real", required=True, help="PATH[:SPLIT] of the real training items")
        sub.add_argument("--synthetic", required=True, help="PATH[:SPLIT] of the synthetic items")
        sub.add_argument("--test", help="PATH:SPLIT of the real test items (segmentation: not with --folds)")
        sub.add_argument("--image-key", default="image")
        sub.add_argument("--synthetic-image-key", default=None, help="default: --image-key")
        sub.add_argument("--concat", nargs="*", type=float, default=[], help="synthetic items per real one")
        sub.add_argument("--replace", nargs="*", type=float, default=[], help="fraction of real items replaced")
        sub.add_argument("--steps", type=int, default=400)
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--lr", type=float, default=3e-3)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--channels", nargs="+", type=int, default=[8, 16, 32, 64])
        sub.add_argument("--device", default="cpu")
        sub.add_argument("--threads", type=int, default=None, help="torch threads (default MEDGEN_NUM_THREADS)")
        sub.add_argument("--out", type=Path, required=True)
        if task == "segmentation":
            sub.add_argument("--label-key", default="label")
            sub.add_argument(
                "--classes", nargs="+", type=int, required=True, help="kept label values, background first"
            )
            sub.add_argument("--merge-into", type=int, required=True, help="where other label values go")
            sub.add_argument("--class-names", nargs="+", default=None)
            sub.add_argument("--label-format", choices=["soft", "index"], default="index")
            sub.add_argument("--normalisation", choices=["zscore_nonzero", "zscore", "none"], default="zscore")
            sub.add_argument("--per-image", action="store_true", help="score 2D images, not stacked volumes")
            sub.add_argument("--slice-key", default=None, help="key ordering a subject's slices (default slice_index)")
            sub.add_argument("--patch-mix", nargs="*", default=[], metavar="ALPHA:P")
            sub.add_argument("--pair-key", default="label", help="key pairing a synthetic item with its real one")
            sub.add_argument("--augment", nargs="*", default=[], choices=TRADITIONAL_AUGMENTATIONS,
                             help="arms training on the real items with one traditional augmentation each")  # fmt: skip
            sub.add_argument("--architecture", choices=ARCHITECTURES, default="unet")
            sub.add_argument("--folds", type=int, default=0, help="K-fold cross-validation on --real by --group-key")
            sub.add_argument("--group-key", default="subject", help="patient id of each item (folds)")
            sub.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE", help="keep matching entries")
        else:
            sub.add_argument("--label-key", required=True, help="integer class of each item")
            sub.add_argument("--group-key", default="subject", help="patient id of each test item")
            sub.add_argument("--normalisation", choices=["zscore_nonzero", "zscore", "none"], default="none")
    args = parser.parse_args(argv)
    if args.task == "classification" or not args.folds:
        if not args.test:
            parser.error("--test is required (segmentation: or --folds K)")
    elif args.test:
        parser.error("--folds tests on the held-out folds of --real; leave out --test")
    args.synthetic_image_key = args.synthetic_image_key or args.image_key
    configure_threads(args.threads)
    started = time.perf_counter()
    output = segmentation(args) if args.task == "segmentation" else classification(args)
    seconds = time.perf_counter() - started
    command = "python -m tools.utility " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json({**output["results"], "seconds": seconds, "command": command}, args.out / "utility.json")
    write_text(f"{output['markdown']}\n\n`{command}` ({seconds:.0f} s)\n", args.out / "utility.md")
    print(output["markdown"])
    return output["results"]


if __name__ == "__main__":
    main()
