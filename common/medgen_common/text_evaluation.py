"""Evaluate a text-conditioned generator of multi-sequence slices (prostate_text_ldm ``evaluate``; prostate spec
section 7.4), with reference classifiers trained on real images:

- :func:`classifier_accuracy` of the lesion (2-way) and sequence (3-way) references, trained with the shared
  :func:`~medgen_common.classification_utility.train_classifier`;
- :func:`control_accuracy`: do samples follow the prompted lesion label and sequence, per prompt cell;
- :func:`pairing_check`: DW generated from a case's real T2W against a text-only and a shuffled-T2W control
  (correlation with the true DW, classifier agreement, lesion localisation);
- :func:`augmentation_experiment`: a lesion classifier trained on real vs real + synthetic images, several seeds;
- :func:`export_reader_studies`: per sequence, a blinded, shuffled real/synthetic x lesion/no-lesion set with the
  answer key apart (the shared :mod:`medgen_common.reader_study`);
- :func:`text_generator_report`: all of them, plus the MediSyn copy check of the synthetic images against the
  training images (:func:`medgen_common.metrics.memorisation_check`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import copy
import logging
import os
import time

import numpy as np
import torch
from torch import nn

from .classification_utility import train_classifier
from .metrics import memorisation_check
from .reader_study import export_reader_study
from .text_generation import follow_up_specs, generate, prompt_specs
from .writers import save_memorisation_gallery, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "classifier_accuracy",
    "control_accuracy",
    "pairing_check",
    "augmentation_experiment",
    "export_reader_studies",
    "text_generator_report",
]


@torch.no_grad()
def predict(network: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per image ``[N]``."""
    device = next(network.parameters()).device
    return torch.cat([network(chunk.float().to(device)).argmax(1).cpu() for chunk in images.split(batch_size)])


def classifier_accuracy(network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(network, images) == labels.long()).float().mean())


def control_accuracy(
    sample_fn: Callable[[list[dict]], torch.Tensor],
    lesion_classifier: nn.Module,
    sequence_classifier: nn.Module,
    sequences: Sequence[str],
    samples_per_prompt: int,
    seed: int = 0,
) -> dict:
    """Lesion and sequence accuracy of samples for every (sequence, lesion) prompt cell.

    ``sample_fn(specs)`` returns images ``[N, 1, H, W]`` for :func:`~medgen_common.text_generation.prompt_specs`
    entries. Returns ``{"cells": {"<sequence>_<lesion|no_lesion>": {"lesion_accuracy", "sequence_accuracy",
    "positive_rate"}}, "lesion_accuracy", "sequence_accuracy"}`` (means over cells).
    """
    cells, offset = {}, 0
    for sequence_index, sequence in enumerate(sequences):
        for lesion in (False, True):
            specs = prompt_specs(samples_per_prompt, seed + offset, [sequence], float(lesion))
            offset += samples_per_prompt
            images = sample_fn(specs)
            lesion_pred, sequence_pred = predict(lesion_classifier, images), predict(sequence_classifier, images)
            cells[f"{sequence}_{'lesion' if lesion else 'no_lesion'}"] = {
                "lesion_accuracy": float((lesion_pred == int(lesion)).float().mean()),
                "sequence_accuracy": float((sequence_pred == sequence_index).float().mean()),
                "positive_rate": float(lesion_pred.float().mean()),
            }
    return {
        "cells": cells,
        "lesion_accuracy": float(np.mean([c["lesion_accuracy"] for c in cells.values()])),
        "sequence_accuracy": float(np.mean([c["sequence_accuracy"] for c in cells.values()])),
    }


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def _localisation_hits(images: torch.Tensor, centres: Sequence, radius_px: float) -> list[bool]:
    """Whether the brightest pixel of each image lies within ``radius_px`` of its true lesion centre (row, column);
    cases without a lesion are skipped."""
    hits = []
    for image, centre in zip(images, centres):
        if centre is None:
            continue
        flat = int(image[0].argmax())
        row, column = divmod(flat, image.shape[-1])
        hits.append(bool(np.hypot(row - centre[0], column - centre[1]) <= radius_px))
    return hits


def pairing_check(
    sample_fn: Callable[[list[dict], torch.Tensor | None], torch.Tensor],
    t2w: torch.Tensor,
    dwi: torch.Tensor,
    labels: Sequence[int],
    centres: Sequence,
    lesion_classifier: nn.Module,
    seed: int = 0,
    radius_px: float = 3.0,
) -> dict:
    """DW from each case's own T2W (``paired``) against two controls: no image (``text_only``) and another case's T2W
    (``shuffled``, a fixed derangement), all with the case's DW prompt and seed.

    ``sample_fn(specs, paired_images_or_None)`` returns ``[N, 1, H, W]``; ``t2w``, ``dwi`` ``[N, 1, H, W]`` are the
    real pairs, ``labels`` their lesion labels and ``centres`` their lesion centres (row, column; None without).
    Per variant: mean Pearson correlation with the true DW, classifier agreement with the label, and the lesion
    localisation hit rate (brightest pixel within ``radius_px`` of the true centre, lesion cases only).
    """
    n = len(t2w)
    if n < 2:
        raise ValueError(f"the pairing check needs at least 2 cases, got {n}.")
    rng = np.random.default_rng(seed)
    specs = []
    for index, label in enumerate(labels):
        spec = prompt_specs(1, seed + index, ["dwi"], 1.0 if int(label) else 0.0)[0]
        specs.append(spec)
    shift = int(rng.integers(1, n))
    variants = {"paired": t2w, "text_only": None, "shuffled": torch.roll(t2w, shift, 0)}
    report = {"num_cases": n, "num_lesion_cases": int(sum(c is not None for c in centres)), "radius_px": radius_px}
    for name, condition in variants.items():
        images = sample_fn(specs, condition)
        hits = _localisation_hits(images, centres, radius_px)
        report[name] = {
            "correlation": float(_pearson(images, dwi).mean()),
            "lesion_agreement": float(
                (predict(lesion_classifier, images) == torch.as_tensor(labels).long()).float().mean()
            ),
            "localisation_hit_rate": float(np.mean(hits)) if hits else None,
        }
    report["real_dwi_shuffled_correlation"] = float(_pearson(torch.roll(dwi, shift, 0), dwi).mean())
    report["paired_beats_controls"] = bool(
        all(report["paired"]["correlation"] > report[c]["correlation"] for c in ("text_only", "shuffled"))
        and all(
            (report["paired"]["localisation_hit_rate"] or 0) > (report[c]["localisation_hit_rate"] or 0)
            for c in ("text_only", "shuffled")
        )
    )
    return report


def augmentation_experiment(
    real_images: torch.Tensor,
    real_labels: torch.Tensor,
    synthetic_images: torch.Tensor,
    synthetic_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 500,
    device: torch.device | str = "cpu",
) -> dict:
    """Table 4.3's ML row at demo scale: the lesion classifier trained on real images vs real + synthetic, tested on
    real held-out images, once per seed; mean and sd of the accuracy per arm (reported as measured)."""
    arms = {
        "real": (real_images, real_labels),
        "real_plus_synthetic": (torch.cat([real_images, synthetic_images]), torch.cat([real_labels, synthetic_labels])),
    }
    report = {
        "num_real": len(real_images),
        "num_synthetic": len(synthetic_images),
        "num_test": len(test_images),
        "seeds": [int(s) for s in seeds],
    }
    for name, (images, labels) in arms.items():
        accuracies = [
            classifier_accuracy(
                train_classifier(images, labels, 2, steps, seed=int(s), device=device), test_images, test_labels
            )
            for s in seeds
        ]
        report[name] = {
            "accuracy": accuracies,
            "mean": float(np.mean(accuracies)),
            "sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
        }
    return report


def export_reader_studies(
    real: dict[str, tuple[torch.Tensor, torch.Tensor]],
    synthetic: dict[str, tuple[torch.Tensor, torch.Tensor]],
    per_cell: int,
    output_dir: str | Path,
    seed: int = 0,
) -> dict:
    """A blinded reader study per sequence (Table 4.3), written by the shared
    :func:`~medgen_common.reader_study.export_reader_study` to ``output_dir/<sequence>/``: ``per_cell`` images of
    each of real/synthetic x lesion/no lesion, shuffled, with the lesion of each image in the answer key.

    ``real`` and ``synthetic`` map a sequence name to ``(images [N, 1, H, W] or [N, 2, H, W] for side-by-side pairs,
    lesion labels [N])``.

    Raises:
        ValueError: a cell has fewer than ``per_cell`` images.
    """
    output_dir = Path(output_dir)
    rng = np.random.default_rng(seed)
    studies = {}
    for sequence in real:
        chosen = {}
        for source, (images, labels) in (("real", real[sequence]), ("synthetic", synthetic[sequence])):
            indices = []
            for lesion in (0, 1):
                candidates = np.flatnonzero(labels.numpy() == lesion)
                if len(candidates) < per_cell:
                    raise ValueError(
                        f"{source} {sequence} has {len(candidates)} images with lesion={lesion}, {per_cell} needed."
                    )
                indices += rng.choice(candidates, per_cell, replace=False).tolist()
            chosen[source] = (
                [images[i] for i in indices],
                [{"sequence": sequence, "lesion": int(labels[i])} for i in indices],
            )
        study = export_reader_study(
            chosen["real"][0], chosen["synthetic"][0], output_dir / sequence, seed=seed,
            real_attributes=chosen["real"][1], synthetic_attributes=chosen["synthetic"][1], upscale=4,
        )  # fmt: skip
        studies[sequence] = {key: study[key] for key in ("num_real", "num_synthetic")}
        studies[sequence].update({key: os.path.relpath(study[key], output_dir) for key in ("answer_key", "responses")})
    return studies


def _load_split(entries: Sequence[dict], preprocessing, sequences: Sequence[str], label_key: str) -> dict:
    """Stack the preprocessed images of every sequence ``[N, 1, H, W]``, the lesion labels and centres."""
    items = [preprocessing(dict(entry)) for entry in entries]
    data = {s: torch.stack([torch.as_tensor(item[s]).float() for item in items]) for s in sequences}
    data["labels"] = torch.as_tensor([int(entry[label_key]) for entry in entries])
    data["centres"] = [entry.get("lesion_centre") for entry in entries]
    return data


def text_generator_report(
    sampler,
    text_network: nn.Module,
    tokenizer,
    training_entries: Sequence[dict],
    test_entries: Sequence[dict],
    preprocessing,
    output_dir: str | Path,
    sequences: Sequence[str] = ("t2w", "adc", "dwi"),
    label_key: str = "lesion_present",
    text_scale: float = 3.0,
    pair_scale: float = 1.0,
    samples_per_prompt: int = 64,
    num_pairing_cases: int = 128,
    classifier_steps: int = 500,
    num_real_augmentation: int = 300,
    augmentation_seeds: Sequence[int] = (0, 1, 2),
    reader_study_per_cell: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    paired_network: nn.Module | None = None,
) -> dict:
    """Run every check of the module and write ``evaluation.json`` (and the reader study) under ``output_dir``.

    As in the chapter, the text studies (control accuracy, synthetic images for the augmentation experiment and the
    single-sequence reader study) use the text-conditioned model ``text_network`` (stage A) and the pairing studies use
    the paired fine-tuned ``paired_network`` (stage B; ``text_network`` when None).

    ``preprocessing`` maps a datalist entry to a dict holding each sequence as ``[1, H, W]`` in [0, 1]. The
    reference classifiers train on every sequence of ``training_entries`` and are scored on ``test_entries``;
    control accuracy is measured unguided (scale 1) and at ``text_scale``; the pairing check and the synthetic
    images use ``text_scale`` and ``pair_scale``. The guided control samples (``samples_per_prompt`` per sequence
    and lesion cell) are the synthetic images of the augmentation experiment and of the copy check.
    """
    output_dir = Path(output_dir)
    started = time.time()
    train, test = (_load_split(e, preprocessing, sequences, label_key) for e in (training_entries, test_entries))

    def pooled(data):
        images = torch.cat([data[s] for s in sequences])
        return (
            images,
            data["labels"].repeat(len(sequences)),
            torch.arange(len(sequences)).repeat_interleave(len(data["labels"])),
        )

    train_images, train_lesion, train_sequence = pooled(train)
    test_images, test_lesion, test_sequence = pooled(test)
    logger.info("training the reference lesion and sequence classifiers on %d real images", len(train_images))
    lesion_classifier = train_classifier(train_images, train_lesion, 2, classifier_steps, seed=seed, device=device)
    sequence_classifier = train_classifier(
        train_images, train_sequence, len(sequences), classifier_steps, seed=seed, device=device
    )
    report: dict = {
        "reference_classifiers": {
            "lesion_accuracy_real_test": classifier_accuracy(lesion_classifier, test_images, test_lesion),
            "lesion_accuracy_real_test_per_sequence": {
                s: classifier_accuracy(lesion_classifier, test[s], test["labels"]) for s in sequences
            },
            "sequence_accuracy_real_test": classifier_accuracy(sequence_classifier, test_images, test_sequence),
        }
    }

    def sampler_with(text: float, pair: float):
        scaled = copy.copy(sampler)
        scaled.text_scale, scaled.pair_scale = float(text), float(pair)
        return scaled

    paired_network = text_network if paired_network is None else paired_network

    def sample_fn(scaled, network=text_network):
        return lambda specs, paired=None: generate(scaled, network, tokenizer, specs, batch_size, device, paired)

    guided, unguided = sampler_with(text_scale, pair_scale), sampler_with(1.0, 1.0)
    guided_samples: list[tuple[list[dict], torch.Tensor]] = []  # reused as the synthetic set of the augmentation

    def recorded(sample):
        def record(specs):
            images = sample(specs)
            guided_samples.append((specs, images))
            return images

        return record

    logger.info("text control: %d samples per prompt cell, unguided and at scale %g", samples_per_prompt, text_scale)
    report["text_control"] = {
        "unguided": control_accuracy(
            sample_fn(unguided), lesion_classifier, sequence_classifier, sequences, samples_per_prompt, seed
        ),
        f"guided_{text_scale:g}": control_accuracy(
            recorded(sample_fn(guided)), lesion_classifier, sequence_classifier, sequences, samples_per_prompt, seed
        ),
        "samples_per_prompt": samples_per_prompt,
    }
    n = min(int(num_pairing_cases), len(test["labels"]))
    if getattr(sampler, "pairing", "none") != "none" and n < 2:
        report["pairing"] = {"skipped": f"the pairing check needs at least 2 test cases; the test split has {n}"}
    elif getattr(sampler, "pairing", "none") != "none":
        logger.info("pairing check on %d test cases (paired, text-only, shuffled T2W)", n)
        report["pairing"] = {
            "pairing": sampler.pairing,
            "text_scale": text_scale,
            "pair_scale": pair_scale,
            **pairing_check(
                sample_fn(guided, paired_network),
                test["t2w"][:n],
                test["dwi"][:n],
                test["labels"][:n].tolist(),
                test["centres"][:n],
                lesion_classifier,
                seed,
            ),
        }

    # the guided control samples: balanced over every sequence, with and without lesion
    synthetic_specs = [spec for specs, _ in guided_samples for spec in specs]
    synthetic = torch.cat([images for _, images in guided_samples])
    synthetic_labels = torch.as_tensor([int(spec["lesion"]) for spec in synthetic_specs])
    logger.info("augmentation experiment: %d synthetic images, %d seeds", len(synthetic_specs), len(augmentation_seeds))
    real_count = min(int(num_real_augmentation), len(train_images))
    real_index = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:real_count]
    report["augmentation"] = augmentation_experiment(
        train_images[real_index],
        train_lesion[real_index],
        synthetic,
        synthetic_labels,
        test_images,
        test_lesion,
        augmentation_seeds,
        classifier_steps,
        device,
    )

    memorisation = memorisation_check(synthetic, train_images)
    save_memorisation_gallery(
        synthetic, train_images, memorisation["distances"], memorisation["nearest_index"],
        output_dir / "memorisation_gallery.png", value_range=(0.0, 1.0),
    )  # fmt: skip
    # the same check on real held-out images says what the threshold means for these data
    real_test = memorisation_check(test_images, train_images)["patch_max"]
    report["memorisation"] = {
        **memorisation["patch_max"],
        "num_synthetic": len(synthetic),
        "num_training": len(train_images),
        "real_test": {key: real_test[key] for key in ("mean", "sd", "flagged_fraction")},
        "gallery": "memorisation_gallery.png",
    }
    by_sequence = {s: torch.as_tensor([spec["sequence"] == s for spec in synthetic_specs]) for s in sequences}
    reader_sequences = [s for s in sequences if s != "dwi"] or list(sequences)
    real_sets = {s: (test[s], test["labels"]) for s in reader_sequences}
    synthetic_sets = {s: (synthetic[by_sequence[s]], synthetic_labels[by_sequence[s]]) for s in reader_sequences}
    if getattr(sampler, "pairing", "none") != "none" and {"t2w", "dwi"} <= set(sequences):
        # the paired study (Table 4.3, third block): T2W and DW side by side, synthetic DW made from a synthetic T2W
        logger.info("synthetic T2W-DW pairs for the paired reader study")
        pair_specs = [
            spec
            for lesion in (0.0, 1.0)
            for spec in prompt_specs(reader_study_per_cell, seed + 20_000 + int(lesion) * 1000, ["t2w"], lesion)
        ]
        synthetic_t2w = sample_fn(guided, paired_network)(pair_specs)
        synthetic_dwi = sample_fn(guided, paired_network)(
            follow_up_specs(pair_specs, "dwi", seed + 30_000), synthetic_t2w
        )
        real_sets["t2w_dwi"] = (torch.cat([test["t2w"], test["dwi"]], 1), test["labels"])
        synthetic_sets["t2w_dwi"] = (
            torch.cat([synthetic_t2w, synthetic_dwi], 1),
            torch.as_tensor([int(spec["lesion"]) for spec in pair_specs]),
        )
    available = min(int((pool[1] == lesion).sum()) for sets in (real_sets, synthetic_sets) for pool in sets.values()
                    for lesion in (0, 1))  # fmt: skip
    if available == 0:
        report["reader_study"] = {"skipped": "every real/synthetic x lesion/no-lesion cell needs an image"}
    else:  # a small test split gives fewer images per cell than asked
        per_cell = min(int(reader_study_per_cell), available)
        report["reader_study"] = {
            "images_per_cell": per_cell,
            "studies": export_reader_studies(real_sets, synthetic_sets, per_cell, output_dir / "reader_study", seed),
        }
    report["seconds"] = round(time.time() - started, 1)
    write_json(report, output_dir / "evaluation.json")
    return report
