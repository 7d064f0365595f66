"""Ignite handlers shared by the bundles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from .engines import skip_nonfinite_loss
from .writers import save_png_grid

__all__ = ["PreviewGridHandler", "LrSchedulersHandler", "NonFiniteLossGuard", "values_of"]


def values_of(data, key: str = "pred") -> list:
    """The per-item values of ``key`` in an engine's output or batch, decollated (a list of dicts) or batched
    (a dict of batch-first values); e.g. the predictions ``[C, *spatial]``."""
    return [item[key] for item in data] if isinstance(data, list) else list(data[key])


class PreviewGridHandler:
    """Collect predictions during a run and write them as one PNG grid when it completes.

    Args:
        path: output PNG.
        kind: ``"label"`` (argmax colours), ``"image"`` or ``"rgb"`` (see :func:`~medgen_common.writers.save_png_grid`).
        max_items: at most this many tiles.
        output_transform: maps ``engine.state.output`` to a list of ``[C, *spatial]`` tensors; default reads
            ``"pred"`` from decollated or batched outputs.
        rotate: as :func:`~medgen_common.writers.save_png_grid` (False for ultrasound, whose rows are depth).
    """

    def __init__(
        self, path: str | Path, kind: str = "label", max_items: int = 32, output_transform: Callable | None = None,
        rotate: bool = True,
    ):  # fmt: skip
        self.path, self.kind, self.max_items, self.rotate = Path(path), kind, max_items, rotate
        self.output_transform = output_transform or values_of
        self._items: list = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self._items.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        if len(self._items) < self.max_items:
            self._items.extend(item.detach().cpu() for item in self.output_transform(engine.state.output))

    def _write(self, engine: Engine) -> None:
        if self._items:
            save_png_grid(self._items[: self.max_items], self.path, kind=self.kind, rotate=self.rotate)
            engine.logger.info(f"preview grid of {min(len(self._items), self.max_items)} outputs written to {self.path}")


class LrSchedulersHandler:
    """Step several learning-rate schedulers (e.g. one per GAN network) at the end of every epoch, or of every
    iteration with ``epoch_level=False``; MONAI's ``LrScheduleHandler`` holds one."""

    def __init__(self, lr_schedulers: Sequence, epoch_level: bool = True):
        self.lr_schedulers, self.epoch_level = list(lr_schedulers), epoch_level

    def attach(self, engine: Engine) -> None:
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event, lambda _: [scheduler.step() for scheduler in self.lr_schedulers])


class NonFiniteLossGuard:
    """Stop, or skip the step, when a ``SupervisedTrainer``'s loss is NaN or infinite.

    The check runs when the loss is computed, before the backward pass, so NaN never reaches the weights.
    ``mode="raise"`` stops training with a ``FloatingPointError`` naming the iteration, the epoch and the loss term;
    ``mode="skip"`` drops that step's gradients (the optimiser leaves every parameter as it was), counts the skip in
    ``engine.state.skipped_nonfinite_steps`` and logs it. (The GAN trainers check each of their loss terms
    themselves, see :meth:`medgen_common.engines.GanTrainerBase.optimizer_step`.)

    Args:
        optimizer: the trainer's optimiser, whose gradients a skipped step discards.
        mode: ``"raise"`` or ``"skip"``.
        loss_name: how the message names the loss term.
    """

    def __init__(self, optimizer, mode: str = "raise", loss_name: str = "training"):
        if mode not in ("raise", "skip"):
            raise ValueError(f"mode must be 'raise' or 'skip', got {mode!r}.")
        self.optimizer, self.mode, self.loss_name = optimizer, mode, loss_name
        self._skip_this_step = False

    def attach(self, engine: Engine) -> None:
        engine.state.skipped_nonfinite_steps = 0
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._check)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._discard_gradients)

    def _check(self, engine: Engine) -> None:
        loss = engine.state.output[CommonKeys.LOSS]
        self._skip_this_step = skip_nonfinite_loss(engine, loss, self.loss_name, self.mode)

    def _discard_gradients(self, engine: Engine) -> None:
        if self._skip_this_step:
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_this_step = False
