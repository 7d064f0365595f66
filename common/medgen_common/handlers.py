"""Ignite handlers shared by the bundles."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ignite.engine import Engine, Events

from .writers import save_png_grid

__all__ = ["PreviewGridHandler", "values_of"]


def values_of(data, key: str = "pred") -> list:
    """The per-item values of ``key`` in an engine's output or batch, decollated (a list of dicts) or batched
    (a dict of batch-first values); e.g. the predictions ``[C, *spatial]``."""
    return [item[key] for item in data] if isinstance(data, list) else list(data[key])


class PreviewGridHandler:
    """Collect predictions during a run and write them as one PNG grid when it completes.

    Args:
        path: output PNG.
        kind: ``"label"`` (argmax colours) or ``"image"``.
        max_items: at most this many tiles.
        output_transform: maps ``engine.state.output`` to a list of ``[C, *spatial]`` tensors; default reads
            ``"pred"`` from decollated or batched outputs.
    """

    def __init__(self, path: str | Path, kind: str = "label", max_items: int = 32, output_transform: Callable | None = None):
        self.path, self.kind, self.max_items = Path(path), kind, max_items
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
            save_png_grid(self._items[: self.max_items], self.path, kind=self.kind)
            engine.logger.info(f"preview grid of {min(len(self._items), self.max_items)} outputs written to {self.path}")
