"""Sampling cost accounting: FLOPs of known layers, NFE from a hook, timing schema on a tiny diffusion U-Net, and the
memory soak that must tell a leak from flat memory."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from medgen_common.benchmark import benchmark_sampling, count_flops, count_network_calls, soak
from medgen_common.guidance import classifier_free_guidance, guided_sample
from medgen_common.sampling import make_scheduler


@pytest.mark.parametrize("c_in, c_out, k, size", [(3, 5, 3, 8), (1, 16, 5, 12)])
def test_conv_flops_are_two_cin_cout_k2_h_w(c_in, c_out, k, size):
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2)
    assert count_flops(lambda: conv(torch.zeros(1, c_in, size, size))) == 2 * c_in * c_out * k * k * size * size


def test_network_calls_are_counted_and_the_first_inputs_kept():
    layer = torch.nn.Linear(2, 2)
    with count_network_calls(layer) as calls:
        for value in range(3):
            layer(torch.full((1, 2), float(value)))
    layer(torch.zeros(1, 2))  # outside the block: not counted
    assert calls.count == 3
    assert torch.equal(calls.first_inputs[0][0], torch.zeros(1, 2))


def tiny_unet() -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=2, out_channels=1, channels=(8, 8), attention_levels=(False, False),
        num_res_blocks=1, norm_num_groups=8,
    ).eval()  # fmt: skip


def sampler_of(network, name: str, steps: int, batch: int):
    scheduler = make_scheduler(name, 1000)
    condition = torch.ones(batch, 1, 8, 8)
    guidance = classifier_free_guidance(2.0)
    return lambda: guided_sample(network, scheduler, guidance, [condition], list(range(batch)), 1, steps)


def test_benchmark_reports_positive_costs_and_the_network_calls():
    network = tiny_unet()
    report = benchmark_sampling(sampler_of(network, "heun", 4, 2), network, 2, warmup=1, repeats=2)
    assert report["nfe"] == 7  # Heun: 2 * steps - 1
    for key in ("gflops_per_nfe", "gflops_per_image", "seconds_per_image", "images_per_second", "peak_memory_mb"):
        assert report[key] > 0, key
    assert report["gflops_other_per_image"] >= 0
    assert report["images_per_second"] == pytest.approx(1 / report["seconds_per_image"])


def test_flops_per_image_scale_linearly_with_nfe():
    network = tiny_unet()
    costs = {steps: benchmark_sampling(sampler_of(network, "ddim", steps, 2), network, 2, warmup=0, repeats=1)
             for steps in (2, 4, 8)}  # fmt: skip
    per_nfe = costs[2]["gflops_per_nfe"]
    for steps, report in costs.items():
        assert report["nfe"] == steps
        assert report["gflops_per_nfe"] == pytest.approx(per_nfe)
        assert report["gflops_per_image"] == pytest.approx(steps * per_nfe, rel=1e-3)


def test_benchmark_refuses_a_sampler_that_never_calls_the_network():
    with pytest.raises(RuntimeError, match="never called the network"):
        benchmark_sampling(lambda: None, tiny_unet(), 1, warmup=0, repeats=1)



def test_soak_sees_a_leak_and_no_growth_without_one():
    kept = []

    def leaking():
        kept.append(bytearray(4 * 2**20))  # 4 MiB kept per call, touched so it is resident

    def clean():
        scratch = bytearray(4 * 2**20)
        del scratch

    leak = soak(leaking, calls=60, warmup_calls=10)
    assert leak["peak_rss_growth_percent"] > 5.0
    assert leak["peak_rss_after_warmup_mb"] - leak["peak_rss_warmup_mb"] == pytest.approx(200, rel=0.25)  # 50 x 4 MiB
    kept.clear()
    flat = soak(clean, calls=60, warmup_calls=10, record_every=5)
    assert abs(flat["peak_rss_growth_percent"]) < 1.0
    assert len(flat["rss_mb"]) == 12 and flat["calls"] == 60
    with pytest.raises(ValueError, match="0 < warmup_calls < calls"):
        soak(clean, calls=10, warmup_calls=10)
