"""Generate images from prompts with a text-conditioned latent diffusion model (prostate_text_ldm inference):

- ``"text"``: prompt -> image;
- ``"paired"``: (real T2W image + DW prompt) -> DW image (sequence translation);
- ``"pair"``: prompt -> synthetic T2W -> DW conditioned on it (a synthetic pair, chapter L1226).

:func:`generate` does the sampling in batches; :func:`run_generation` is the inference workflow: it writes one
NIfTI per image (``<name>_<sequence>.nii.gz``, H x W x 1 float32 in [0, 1]), a PNG overview and ``prompts.csv``,
the prompt log (name, seed, mode, sequence, lesion, prompt, source image).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .text import make_prompt
from .writers import save_nifti, save_png_grid, write_csv, write_json

__all__ = ["MODES", "prompt_specs", "paired_specs", "follow_up_specs", "generate", "run_generation"]

MODES = ("text", "paired", "pair")


def prompt_specs(
    num_samples: int,
    seed: int = 0,
    sequences: Sequence[str] = ("t2w", "adc", "dwi"),
    lesion_probability: float = 0.5,
    prompts: Sequence[str] | None = None,
) -> list[dict]:
    """``num_samples`` specs ``{"seed", "prompt", "sequence", "lesion"}``: sample ``i`` has seed ``seed + i``.

    Given ``prompts`` they are used in turn (``sequence`` and ``lesion`` unknown: None); otherwise sequence ``i``
    cycles through ``sequences``, lesion is drawn with ``lesion_probability`` and the prompt by
    :func:`~medgen_common.text.make_prompt`, all from ``numpy.random.default_rng(seed)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    rng = np.random.default_rng(seed)
    specs = []
    for index in range(int(num_samples)):
        spec = {"seed": int(seed) + index}
        if prompts:
            spec.update(prompt=str(prompts[index % len(prompts)]), sequence=None, lesion=None)
        else:
            sequence, lesion = sequences[index % len(sequences)], bool(rng.random() < lesion_probability)
            spec.update(prompt=make_prompt(rng, sequence, lesion), sequence=sequence, lesion=lesion)
        specs.append(spec)
    return specs


def paired_specs(entries: Sequence[dict], num_samples: int, seed: int = 0, label_key: str = "lesion_present",
                 target_sequence: str = "dwi") -> list[dict]:  # fmt: skip
    """Specs for the ``"paired"`` mode from datalist entries (cycled): each keeps its entry (the paired image is
    loaded from it) and gets a ``target_sequence`` prompt with the entry's own lesion label, as prompts come from
    lesion masks for user data."""
    if not entries:
        raise ValueError("the paired mode needs at least one entry with a paired image.")
    rng = np.random.default_rng(seed)
    specs = []
    for index in range(int(num_samples)):
        entry = entries[index % len(entries)]
        if label_key not in entry:
            raise KeyError(f"entry {entry} has no '{label_key}': the prompt's lesion label comes from it.")
        lesion = bool(int(entry[label_key]))
        specs.append({"seed": int(seed) + index, "prompt": make_prompt(rng, target_sequence, lesion),
                      "sequence": target_sequence, "lesion": lesion, "entry": entry})  # fmt: skip
    return specs


def follow_up_specs(specs: Sequence[dict], sequence: str, seed: int) -> list[dict]:
    """The second image of synthetic pairs: each spec's seed and lesion label with a new ``sequence`` prompt drawn
    from ``numpy.random.default_rng(seed)`` (e.g. the DW prompt for a synthetic T2W)."""
    rng = np.random.default_rng(seed)
    return [{**spec, "prompt": make_prompt(rng, sequence, spec["lesion"]), "sequence": sequence} for spec in specs]


@torch.no_grad()
def generate(
    sampler,
    network: nn.Module,
    tokenizer,
    specs: Sequence[dict],
    batch_size: int,
    device: torch.device | str,
    paired_images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images ``[N, 1, H, W]`` for ``specs`` (prompts and seeds) with a :class:`TextLatentSampler`, in batches;
    ``paired_images`` ``[N, 1, H, W]`` condition the samples one to one."""
    outputs = []
    for start in range(0, len(specs), int(batch_size)):
        chunk = specs[start : start + int(batch_size)]
        tokens = tokenizer([s["prompt"] for s in chunk]).to(device)
        pair = paired_images[start : start + len(chunk)].to(device) if paired_images is not None else None
        outputs.append(sampler(tokens, network, pair, seeds=[s["seed"] for s in chunk]).cpu())
    return torch.cat(outputs)


def run_generation(
    mode: str,
    sampler,
    network: nn.Module,
    tokenizer,
    output_dir: str | Path,
    num_samples: int,
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    sequences: Sequence[str] = ("t2w", "adc", "dwi"),
    prompts: Sequence[str] | None = None,
    paired_entries: Sequence[dict] | None = None,
    load_image=None,
    spacing: Sequence[float] | None = None,
    lesion_probability: float = 0.5,
) -> list[Path]:
    """The inference workflow: generate in ``mode`` (see ``MODES``) and write NIfTI files, ``samples.png``,
    ``prompts.csv`` and ``datalist_synthetic.json`` under ``output_dir``; returns the NIfTI paths.

    The datalist has the demo datalist's keys, so the synthetic set drops in where the real one goes (e.g.
    ``tools.utility``): one ``training`` entry per sample with its file under its sequence's name (``"t2w"``; a pair
    is one entry with ``"t2w"`` and ``"dwi"``), ``"lesion_present"`` when the prompt set it, ``"prompt"`` and
    ``"seed"``.

    ``paired`` mode takes ``paired_entries`` (datalist entries with the T2W path under ``"t2w"`` and a lesion label)
    and ``load_image`` (path -> ``[1, H, W]`` tensor, e.g. the bundle's load transforms).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if mode == "paired":
        if paired_entries is None or load_image is None:
            raise ValueError("the paired mode needs paired_entries and load_image.")
        specs = paired_specs(paired_entries, num_samples, seed)
        t2w = torch.stack([torch.as_tensor(load_image(s["entry"]["t2w"])).float() for s in specs])
        results = [(specs, generate(sampler, network, tokenizer, specs, batch_size, device, t2w))]
        sources = [s["entry"]["t2w"] for s in specs]
    elif mode == "pair":
        if prompts:
            raise ValueError(
                "the pair mode draws its own T2W and DW prompts (set lesion_probability); give no prompts."
            )
        t2w_specs = prompt_specs(num_samples, seed, ["t2w"], lesion_probability)
        t2w = generate(sampler, network, tokenizer, t2w_specs, batch_size, device)
        dwi_specs = follow_up_specs(t2w_specs, "dwi", seed + 1)
        results = [
            (t2w_specs, t2w),
            (dwi_specs, generate(sampler, network, tokenizer, dwi_specs, batch_size, device, t2w)),
        ]
        sources = [""] * num_samples
    else:
        specs = prompt_specs(num_samples, seed, sequences, lesion_probability, prompts)
        results = [(specs, generate(sampler, network, tokenizer, specs, batch_size, device))]
        sources = [""] * num_samples

    paths, rows, previews, entries = [], [], [], []
    for specs, images in results:
        for index, (spec, image, source) in enumerate(zip(specs, images, sources)):
            sequence = spec["sequence"] or "image"
            name = f"sample_{spec['seed']:06d}_{sequence}"
            paths.append(save_nifti(image.numpy(), output_dir / f"{name}.nii.gz", spacing=spacing))
            entry = {sequence: f"{name}.nii.gz", "prompt": spec["prompt"], "seed": spec["seed"]}
            if spec["lesion"] is not None:
                entry["lesion_present"] = int(spec["lesion"])
            if mode == "pair" and index < len(entries):  # the DW image of pair ``index``
                entries[index][sequence] = entry[sequence]
            else:
                entries.append(entry)
            rows.append({"name": name, "seed": spec["seed"], "mode": mode, "sequence": spec["sequence"] or "",
                         "lesion": "" if spec["lesion"] is None else int(spec["lesion"]), "prompt": spec["prompt"],
                         "source_image": source})  # fmt: skip
        previews += list(images[:16])
    save_png_grid(previews, output_dir / "samples.png", value_range=(0.0, 1.0), rotate=False, ncols=8)
    write_csv(
        output_dir / "prompts.csv", ["name", "seed", "mode", "sequence", "lesion", "prompt", "source_image"], rows
    )
    write_json({"training": entries}, output_dir / "datalist_synthetic.json")
    return paths
