"""prostate_text_ldm configs: the pitfalls the issue pins (clip_sample, guidance null, context shape, pairing) and
the user-data workflow; the harness (tests/test_bundles.py) runs every workflow end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medgen_common.guidance import NULL_CONTEXT_VALUE
from tools import bundles as harness

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "prostate_text_ldm"
TRAIN = ["configs/train_autoencoder.json", "configs/train_diffusion.json"]
INFERENCE = ["configs/inference.json"]


def _parser(files, demo=True, **overrides):
    parser = ConfigParser()
    parser.read_config(harness.config_paths(BUNDLE, files, demo=demo))
    parser["bundle_root"] = str(BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("demo", [True, False], ids=["demo", "full"])
def test_schedulers_never_clip_latents_to_the_image_range_and_use_the_cosine_schedule(demo):
    train = _parser(TRAIN, demo).get_parsed_content("noise_scheduler")
    sample = _parser(INFERENCE, demo).get_parsed_content("noise_scheduler")
    assert train.clip_sample is False
    # sampling bounds the predicted x0 to +-6 latent SDs (unit-variance latents reach about -6), not to [-1, 1]
    assert sample.clip_sample is True and list(sample.clip_sample_values) == [-6.0, 6.0]
    torch.testing.assert_close(train.alphas_cumprod, sample.alphas_cumprod)
    reference = __import__("monai").networks.schedulers.DDPMScheduler(1000, schedule="cosine")
    torch.testing.assert_close(train.alphas_cumprod, reference.alphas_cumprod)


@pytest.mark.parametrize("pairing, tokens", [("concat", 16), ("crossattn", 17), ("none", 16)])
def test_context_shape_and_input_channels_follow_the_pairing(pairing, tokens):
    parser = _parser(INFERENCE, pairing=pairing)
    network = parser.get_parsed_content("network_def")
    tokenizer = parser.get_parsed_content("tokenizer")
    ids = tokenizer(["A T2 image of a prostate with a lesion", "Prostate DW image without lesion"])
    code = torch.randn(2, 128) if pairing == "crossattn" else None
    context = network.encode_context(ids, code)
    assert context.shape == (2, tokens, 64)
    assert parser.get_parsed_content("diffusion_in_channels") == (6 if pairing == "concat" else 3)
    # the training dropout null is the -1 context the sampler's unconditional branch uses
    dropped = network.encode_context(ids, code, keep_text=torch.tensor([False, True]))
    assert torch.all(dropped[0] == NULL_CONTEXT_VALUE)


def test_training_and_inference_configs_agree():
    train, inference = _parser(TRAIN + ["configs/train_paired.json"]), _parser(INFERENCE)
    for key in ("pairing", "latent_shape", "diffusion_in_channels", "max_prompt_length", "vocab_size", "text_embedding_dim",
                "num_train_timesteps", "sequences"):  # fmt: skip
        assert train.get_parsed_content(key) == inference.get_parsed_content(key), key
    assert (
        train.get_parsed_content("train#handlers#0#final_filename")
        == Path(inference.get_parsed_content("model_file")).name
    )
    # stage B pairs every DW with its T2W; stage A never does
    assert _parser(TRAIN).get_parsed_content("pair_probability") == 0.0
    assert train.get_parsed_content("pair_probability") == 1.0
    full = _parser(TRAIN, demo=False)
    assert full.get_parsed_content("diffusion_channels") == [192 * m for m in (1, 1, 2, 2, 4, 4)]  # Table 4.2
    assert full.get_parsed_content("text_embedding_dim") == 512 and full.get_parsed_content("batch_size") == 7


def test_prepare_slices_workflow_runs(tmp_path):
    import nibabel as nib
    import numpy as np

    entries = []
    for case in range(2):
        names = {}
        for key in ("t2w", "adc", "dwi", "lesion"):
            array = (
                np.random.default_rng(case).uniform(0, 1, (16, 16, 12)) if key != "lesion" else np.zeros((16, 16, 12))
            )
            nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(tmp_path / f"c{case}_{key}.nii.gz"))
            names[key] = f"c{case}_{key}.nii.gz"
        entries.append(names)
    (tmp_path / "volumes.json").write_text(json.dumps({"training": entries}))
    harness.run_workflow(
        BUNDLE, [str(BUNDLE / "configs/prepare_slices.json")],
        overrides={"volume_datalist": str(tmp_path / "volumes.json"), "dataset_dir": str(tmp_path / "slices")},
    )  # fmt: skip
    datalist = json.loads((tmp_path / "slices" / "datalist_2d.json").read_text())
    assert len(datalist["training"]) == 20 and {i["slice"] for i in datalist["training"]} == set(range(1, 11))
