"""Resumable training: one file with everything a training run needs to continue exactly where it stopped.

:class:`TrainingStateHandler` saves, every ``save_interval`` iterations and at the end of every epoch, the state of
each object it is given (networks, optimisers, LR schedulers, EMA copies, discriminators, ...), the engine's epoch
and iteration, and the random state: Python's, NumPy's, torch's (CPU and CUDA) and that of every MONAI random
transform of the training data. The file is written to a temporary name and renamed, so a killed run leaves the
previous state intact. With ``resume=True`` the run loads it and continues.

A resumed run reproduces the uninterrupted one on CPU, also from a state saved in the middle of an epoch: the random
state at the start of the current pass over the data is stored too, so the resumed run draws the same data order and
augmentations, loads and skips the batches already trained on (data loading only, no training), and then restores
the random state of the moment the file was written.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, Randomizable

from .runtime import is_main_process
from .writers import atomic_path

__all__ = ["TrainingStateHandler", "capture_random_state", "restore_random_state", "data_transforms"]

logger = logging.getLogger(__name__)


def _walk(transform, seen: set | None = None) -> list:
    """``transform`` and every transform nested in it, depth first: the members of a ``Compose`` (``OneOf``, ...)
    and the array transforms a dictionary transform holds as attributes (``RandGaussianNoised`` draws from the
    generator of its ``RandGaussianNoise``). Not ``Compose.flatten()``: that builds a new ``Compose``, which re-seeds
    every child transform."""
    seen = set() if seen is None else seen
    if id(transform) in seen:
        return []
    seen.add(id(transform))
    children = list(transform.transforms) if isinstance(transform, Compose) else []
    children += [value for value in vars(transform).values() if isinstance(value, (Randomizable, Compose))]
    return [transform, *(item for child in children for item in _walk(child, seen))]


def data_transforms(engine: Engine) -> list[Randomizable]:
    """The random transforms (with their own NumPy generator) of the engine's training dataset, in a fixed order."""
    loader = getattr(engine, "data_loader", None) or engine.state.dataloader
    transform = getattr(getattr(loader, "dataset", None), "transform", None)
    if transform is None:
        return []
    return [t for t in _walk(transform) if isinstance(t, Randomizable) and hasattr(t, "R")]


def capture_random_state(transforms: list[Randomizable] = ()) -> dict:
    """Python, NumPy, torch (CPU and CUDA) and ``transforms``' random states, as tensors and plain values (loadable
    with ``torch.load(weights_only=True)``)."""

    def numpy_state(state: tuple) -> dict:
        kind, keys, position, has_gauss, cached = state
        return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip

    return {
        "python": random.getstate(),
        "numpy": numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "transforms": [numpy_state(t.R.get_state()) for t in transforms],
    }


def restore_random_state(state: Mapping, transforms: list[Randomizable] = ()) -> None:
    """Undo :func:`capture_random_state`; the transforms must be the same, in the same order.

    Raises:
        ValueError: a different number of random transforms than were saved (the data pipeline changed).
    """

    def numpy_state(saved: Mapping) -> tuple:
        keys = saved["keys"].numpy().astype(np.uint32)
        return saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"]

    if len(state["transforms"]) != len(transforms):
        raise ValueError(
            f"the training state holds {len(state['transforms'])} random data transforms, this run has "
            f"{len(transforms)}: the data pipeline changed since it was saved, so the run cannot resume exactly."
        )
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for transform, saved in zip(transforms, state["transforms"]):
        transform.R.set_state(numpy_state(saved))


class TrainingStateHandler:
    """Save the whole training state every ``save_interval`` iterations and every epoch; resume from it.

    Args:
        path: the state file (e.g. ``models/diffusion_training_state.pt``).
        objects: ``{name: object with state_dict() / load_state_dict()}``: networks, optimisers, LR schedulers,
            EMA models, discriminators, GradScalers; None values (parts a configuration does not use) are left out.
            The engine's epoch and iteration are always included.
        save_interval: iterations between saves (0: at the end of each epoch only). Only the main process of a
            distributed run writes; every rank resumes.
        resume: load ``path`` when the run starts and continue from it; without a file the run starts from
            scratch and says so in the log.
    """

    def __init__(self, path: str | Path, objects: Mapping, save_interval: int = 0, resume: bool = False):
        if save_interval < 0:
            raise ValueError(f"save_interval must be >= 0 iterations, got {save_interval}.")
        objects = {name: item for name, item in objects.items() if item is not None}  # None: a part not in use
        for name, item in objects.items():
            if not (hasattr(item, "state_dict") and hasattr(item, "load_state_dict")):
                raise TypeError(f"'{name}' has no state_dict/load_state_dict, so it cannot be saved and resumed.")
        self.path, self.objects = Path(path), objects
        self.save_interval, self.resume = int(save_interval), bool(resume)
        self._pass_start_state: dict | None = None
        self._batches_in_pass, self._first_epoch, self._resumed = 0, True, None
        self._saved_iteration, self._saving = -1, False
        self._skip_batches, self._state_after_skip = 0, None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._first_epoch_started)
        engine.add_event_handler(Events.DATALOADER_STOP_ITERATION, self._new_data_pass)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._skip_trained_batches)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._count_batch)

    def _start(self, engine: Engine) -> None:
        self._first_epoch = True
        self._load(engine)
        if not self._saving:  # registered now, after every handler attached with the engine, so a save sees the
            self._saving = True  # iteration's and the epoch's work done (LR steps, EMA updates, validation)
            if self.save_interval:
                engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self._save)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    # A data pass starts where the engine makes a new data iterator: after the first EPOCH_STARTED of a run, and
    # whenever the iterator runs out (which need not be at an epoch boundary when epoch_length != len(loader)).

    def _new_data_pass(self, engine: Engine) -> None:
        self._pass_start_state, self._batches_in_pass = capture_random_state(data_transforms(engine)), 0

    def _count_batch(self, engine: Engine) -> None:
        self._batches_in_pass += 1

    def _first_epoch_started(self, engine: Engine) -> None:
        if not self._first_epoch:
            return
        self._first_epoch = False
        if self._resumed is None:
            self._new_data_pass(engine)
            return
        state, self._resumed = self._resumed, None
        transforms = data_transforms(engine)
        done = state["batches_in_pass"]
        if done >= len(engine.state.dataloader):  # the saved pass was used up: the next starts from the saved state
            restore_random_state(state["random"], transforms)
            self._new_data_pass(engine)
        else:  # replay the pass's data order, skip the batches trained on, then continue the random stream
            restore_random_state(state["random_at_pass_start"], transforms)
            self._pass_start_state, self._batches_in_pass = state["random_at_pass_start"], done
            self._skip_batches, self._state_after_skip = done, state["random"]

    def _skip_trained_batches(self, engine: Engine) -> None:
        if not self._skip_batches:
            return
        for _ in range(self._skip_batches):
            next(engine._dataloader_iter)  # ignite keeps the current data iterator here
        restore_random_state(self._state_after_skip, data_transforms(engine))
        self._skip_batches, self._state_after_skip = 0, None

    def _save(self, engine: Engine) -> None:
        if engine.state.iteration == self._saved_iteration or not is_main_process():
            return  # saved already at this iteration (the interval and the epoch end coincide)
        state = {name: item.state_dict() for name, item in self.objects.items()}
        state["engine"] = {"iteration": engine.state.iteration, "epoch_length": engine.state.epoch_length}
        state["random"] = capture_random_state(data_transforms(engine))
        state["random_at_pass_start"], state["batches_in_pass"] = self._pass_start_state, self._batches_in_pass
        with atomic_path(self.path) as temporary:
            torch.save(state, temporary)
        self._saved_iteration = engine.state.iteration

    def _load(self, engine: Engine) -> None:
        if not self.resume:
            return
        if not self.path.is_file():
            logger.warning(f"resume requested but there is no training state at {self.path}: starting from scratch.")
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise KeyError(f"the training state {self.path} has no {missing}; it was written by another workflow.")
        saved = state["engine"]
        if saved["epoch_length"] != engine.state.epoch_length:
            raise ValueError(
                f"{self.path} was saved with {saved['epoch_length']} iterations per epoch, this run has "
                f"{engine.state.epoch_length}: the data or epoch_length changed, so it cannot resume exactly."
            )
        transforms = data_transforms(engine)
        if len(state["random"]["transforms"]) != len(transforms):
            restore_random_state(state["random"], transforms)  # raises, naming the mismatch
        for name, item in self.objects.items():
            item.load_state_dict(state[name])
        engine.load_state_dict({"iteration": saved["iteration"], "epoch_length": saved["epoch_length"],
                                "max_epochs": engine.state.max_epochs})  # fmt: skip
        self._saved_iteration, self._resumed = saved["iteration"], state
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}.")
