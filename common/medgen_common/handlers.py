"""Ignite handlers shared by the bundles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ignite.engine import Engine, Events

from .writers import save_png_grid

__all__ = ["PreviewGridHandler", "LrSchedulersHandler", "values_of"]


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
