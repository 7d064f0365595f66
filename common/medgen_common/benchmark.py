"""What a sample costs: network evaluations (NFE), FLOPs, wall time and memory of any sampling call.

The numbers follow EDM-Lx's protocol (images/s against NFE): warm-up runs first, CUDA is synchronised around each
timed run, FLOPs come from ``torch.utils.flop_counter`` (2 per multiply-add, as papers count them), and the network
evaluations are counted by a forward hook on the denoising network, so a sampler cannot misreport them.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "NetworkCalls",
    "count_network_calls",
    "count_flops",
    "benchmark_sampling",
    "environment",
    "resident_memory_mb",
    "soak",
]


class NetworkCalls:
    """Calls of one module recorded by :func:`count_network_calls`: ``count`` and the first call's inputs."""

    def __init__(self):
        self.count = 0
        self.first_inputs: tuple[tuple, dict] | None = None


@contextlib.contextmanager
def count_network_calls(network: nn.Module) -> Iterator[NetworkCalls]:
    """Count ``network``'s forward calls inside the block (a batched call, e.g. both CFG branches, counts once)."""
    calls = NetworkCalls()

    def hook(module, args, kwargs):
        if calls.first_inputs is None:
            calls.first_inputs = (
                tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args),
                {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
            )
        calls.count += 1

    handle = network.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call of ``function`` (2 per multiply-add; convolutions, matmuls, attention)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        function()
    return int(counter.get_total_flops())


def peak_resident_memory_mb() -> float:
    """This process's peak resident set size in MiB since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def resident_memory_mb() -> float:
    """This process's current resident set size in MiB (``/proc/self/status`` on Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return peak_resident_memory_mb()


def soak(function: Callable[[], object], calls: int = 1000, warmup_calls: int = 100, record_every: int = 10) -> dict:
    """Call ``function`` ``calls`` times in a loop and report whether memory stays flat after ``warmup_calls``.

    The resident set is read after every call. Returns ``peak_rss_warmup_mb`` (the highest reading during the
    warm-up), ``peak_rss_after_warmup_mb`` (the highest after it), ``peak_rss_growth_percent`` between the two (the
    figure to keep under 5 %; a leak makes it grow with ``calls``), a trace of the readings every ``record_every``
    calls (``rss_mb``) and ``seconds``. Readings are of this process only, so earlier work in it does not hide a leak.
    """
    if not 0 < warmup_calls < calls:
        raise ValueError(f"need 0 < warmup_calls < calls, got {warmup_calls} and {calls}.")
    started = time.perf_counter()
    readings = []
    with torch.no_grad():
        for _ in range(calls):
            function()
            readings.append(resident_memory_mb())
    warmup_peak, after_peak = max(readings[:warmup_calls]), max(readings[warmup_calls:])
    return {
        "calls": calls,
        "warmup_calls": warmup_calls,
        "peak_rss_warmup_mb": warmup_peak,
        "peak_rss_after_warmup_mb": after_peak,
        "peak_rss_growth_percent": 100.0 * (after_peak - warmup_peak) / warmup_peak,
        "rss_mb": [round(value, 1) for value in readings[record_every - 1 :: record_every]],
        "record_every": record_every,
        "seconds": time.perf_counter() - started,
    }


def environment(device: torch.device | str) -> dict:
    """Versions and hardware a benchmark ran on."""
    import monai

    device = torch.device(device)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
    }


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_sampling(
    sample: Callable[[], object],
    network: nn.Module,
    images_per_call: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
) -> dict:
    """Time ``sample()`` (which makes ``images_per_call`` images with ``network`` as its denoiser).

    Returns a dict with ``nfe`` (network calls per ``sample()``), ``gflops_per_nfe`` (one call on the whole batch,
    divided by the images), ``gflops_per_image`` (everything ``sample`` runs, e.g. the decoder too),
    ``gflops_other_per_image`` (what is not the denoiser), ``seconds_per_image``, ``images_per_second`` (median of
    ``repeats`` runs after ``warmup``) and the peak memory (CUDA allocator, else the process's resident peak).
    """
    device = torch.device(device)
    if images_per_call < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"need images_per_call >= 1, repeats >= 1, warmup >= 0; got {images_per_call}, {repeats}, {warmup}."
        )
    with torch.no_grad(), count_network_calls(network) as calls:
        for _ in range(warmup):
            sample()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for _ in range(repeats):
            _synchronise(device)
            started = time.perf_counter()
            sample()
            _synchronise(device)
            seconds.append(time.perf_counter() - started)
    if calls.count == 0:
        raise RuntimeError("sample() never called the network given as its denoiser; pass the module it runs.")
    nfe = calls.count // (warmup + repeats)
    args, kwargs = calls.first_inputs
    network_flops = count_flops(lambda: network(*args, **kwargs))
    total_flops = count_flops(sample)
    median = sorted(seconds)[len(seconds) // 2]
    return {
        "images_per_call": int(images_per_call),
        "nfe": nfe,
        "gflops_per_nfe": network_flops / images_per_call / 1e9,
        "gflops_per_image": total_flops / images_per_call / 1e9,
        "gflops_other_per_image": (total_flops - nfe * network_flops) / images_per_call / 1e9,
        "seconds_per_image": median / images_per_call,
        "images_per_second": images_per_call / median,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_resident_memory_mb()
        ),
        "peak_memory_kind": "cuda allocator" if device.type == "cuda" else "process resident set (high-water mark)",
    }
