"""Tests of medgen_common.runtime: device and precision choice, threads, seeding and rank-dependent handlers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

import medgen_common
from medgen_common.runtime import (
    autocast_dtype,
    autocast_enabled,
    configure_threads,
    handlers_for_rank,
    is_main_process,
    seed_everything,
    select_device,
)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of machines without CUDA")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- devices and precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu "])
def test_select_device_cpu(name):
    assert select_device(name) == torch.device("cpu")


@needs_no_cuda
def test_select_device_auto_falls_back_to_cpu():
    assert select_device("auto") == torch.device("cpu")
    assert select_device() == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_select_device_cuda_without_cuda_raises(name):
    with pytest.raises(ValueError, match=f"device '{name}' was requested but CUDA is not available"):
        select_device(name)


def test_select_device_is_exported_at_package_level():
    assert medgen_common.select_device is select_device
    assert medgen_common.configure_threads is configure_threads


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_autocast_is_disabled_on_cpu_even_when_requested(device):
    assert autocast_enabled(device, requested=True) is False
    assert autocast_enabled(device, requested=False) is False


def test_autocast_is_enabled_on_cuda_only_when_requested():
    # torch.device("cuda") can be built without a GPU: only the device type matters here
    assert autocast_enabled("cuda", requested=True) is True
    assert autocast_enabled("cuda:0", requested=False) is False


def test_autocast_dtype_is_float32_on_cpu():
    assert autocast_dtype("cpu") == torch.float32
    assert autocast_dtype(torch.device("cpu")) == torch.float32


# --- threads ---------------------------------------------------------------------------------------------------------


def test_configure_threads_sets_torch_threads(restore_threads):
    torch.set_num_threads(2)
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1


def test_configure_threads_reads_environment_when_none(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    monkeypatch.setenv("MEDGEN_NUM_THREADS", "2")
    assert configure_threads(None) == 2
    assert torch.get_num_threads() == 2


def test_configure_threads_without_environment_keeps_torch_default(monkeypatch, restore_threads):
    monkeypatch.delenv("MEDGEN_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert configure_threads() == 2
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", [0, -1])
def test_configure_threads_rejects_fewer_than_one(value, restore_threads):
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match=f"num_threads must be >= 1, got {value}"):
        configure_threads(value)
    assert torch.get_num_threads() == 1


def test_configure_threads_rejects_zero_from_environment(monkeypatch, restore_threads):
    monkeypatch.setenv("MEDGEN_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="got 0"):
        configure_threads(None)


# --- seeding ---------------------------------------------------------------------------------------------------------


def test_seed_everything_makes_torch_numpy_and_python_random_reproducible():
    seed_everything(1234)
    first = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    seed_everything(1234)
    second = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]
    seed_everything(4321)
    assert not torch.equal(torch.rand(5), first[0])


def test_seed_everything_with_none_leaves_the_random_state_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    seed_everything(None)
    assert torch.equal(torch.rand(3), expected)


def test_seed_everything_deterministic_requests_deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


# --- distributed helpers ---------------------------------------------------------------------------------------------


def test_is_main_process_outside_distributed():
    assert not dist.is_initialized()
    assert is_main_process() is True


def test_handlers_for_rank_returns_every_handler_on_the_main_process():
    handlers = [object(), "stats handler", 3]
    out = handlers_for_rank(handlers)
    assert out == handlers
    assert out is not handlers  # a copy: the caller's list is not shared


def test_handlers_for_rank_keeps_only_validation_and_lr_schedules_on_other_ranks(monkeypatch):
    from monai.handlers import CheckpointSaver, LrScheduleHandler, ValidationHandler

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert is_main_process() is False
    validation = ValidationHandler(interval=1)
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    schedule = LrScheduleHandler(torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5), print_lr=False)
    saver = CheckpointSaver(save_dir="unused", save_dict={"net": torch.nn.Linear(1, 1)})
    assert handlers_for_rank([saver, schedule, validation, "logger"]) == [schedule, validation]
