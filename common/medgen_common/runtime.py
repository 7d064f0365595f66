"""Device, precision, seeding and thread settings shared by every bundle.

Bundles call these from their configs, e.g. ``"device": "$medgen_common.select_device(@device_name)"``.
"""

from __future__ import annotations

import os

import torch
from monai.utils import set_determinism

__all__ = [
    "select_device",
    "autocast_enabled",
    "autocast_dtype",
    "configure_threads",
    "seed_everything",
    "distributed_device",
    "init_distributed",
    "finalize_distributed",
    "is_main_process",
    "wrap_distributed",
    "handlers_for_rank",
    "load_trained",
]


def select_device(name: str = "auto") -> torch.device:
    """Return the torch device a workflow should run on.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: when CUDA is requested on a machine without it.
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was requested but CUDA is not available; use 'cpu' or 'auto'.")
    return device


def autocast_enabled(device: torch.device | str, requested: bool = True) -> bool:
    """Whether mixed precision should be used: only when requested and the device is CUDA."""
    return bool(requested) and torch.device(device).type == "cuda"


def autocast_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on CUDA devices that support it, float16 on other CUDA devices, float32 on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def configure_threads(num_threads: int | None = None) -> int:
    """Set the number of CPU threads torch uses and return it.

    On small shared machines OpenMP spin-waiting with more threads than free cores has made one CPU training
    step 10-15x slower, so the count is a setting. ``None`` reads ``MEDGEN_NUM_THREADS`` and falls back to
    torch's default. Tests and CI use 1 with ``OMP_WAIT_POLICY=PASSIVE``.
    """
    if num_threads is None:
        env_value = os.environ.get("MEDGEN_NUM_THREADS")
        num_threads = int(env_value) if env_value else torch.get_num_threads()
    num_threads = int(num_threads)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}.")
    torch.set_num_threads(num_threads)
    return num_threads


def seed_everything(seed: int | None, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally request deterministic algorithms."""
    if seed is None:
        return
    set_determinism(seed=int(seed), use_deterministic_algorithms=deterministic or None)


def distributed_device() -> torch.device:
    """Device of this process under ``torchrun``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed() -> None:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on CPU) and select this rank's GPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(distributed_device())


def finalize_distributed() -> None:
    """Wait for every rank, then leave the process group if one was joined (a rank that leaves while others still
    save checkpoints has aborted gloo at exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 inside them (the rank that logs and saves)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def wrap_distributed(network: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``network`` (device ids only on CUDA)."""
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids)


def handlers_for_rank(handlers: list) -> list:
    """All ``handlers`` on the main process; on other ranks only those every rank must run (validation, whose
    metrics are reduced across ranks, learning-rate schedules, which must stay in step, and the training state,
    which every rank resumes from and only the main process writes), so logs and checkpoints are written once."""
    if is_main_process():
        return list(handlers)
    from monai.handlers import LrScheduleHandler, ValidationHandler

    from .handlers import LrSchedulersHandler, NonFiniteLossGuard
    from .training_state import TrainingStateHandler

    every_rank = (LrScheduleHandler, LrSchedulersHandler, ValidationHandler, TrainingStateHandler, NonFiniteLossGuard)
    return [handler for handler in handlers if isinstance(handler, every_rank)]


def load_trained(
    network: torch.nn.Module, path: str | os.PathLike, device: torch.device | str = "cpu", frozen: bool = True
) -> torch.nn.Module:
    """Load a state dict saved by a training workflow into ``network`` (``weights_only=True``); return it frozen
    in eval mode, or as it was (trainable) with ``frozen=False``, e.g. to fine-tune it.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names the workflow's checkpoint file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no trained weights at '{path}'; run the training workflow that writes it first.")
    network.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return network.to(device).eval().requires_grad_(False) if frozen else network.to(device)
