"""One progress bar over a fit's epochs, for runs whose epochs are a step or two (full-batch data)."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from typing_extensions import override

from .events import EventKind, StallEvent, out_of_stall
from .plateau_rule import StallReporter


def open_stall(trainer: L.Trainer) -> StallEvent | None:
    """The latest stall event while the run is still in it, by :func:`~.events.out_of_stall`: the rule
    by which PlateauEscape undoes its kicks."""
    for callback in trainer.callbacks:
        if not isinstance(callback, StallReporter):
            continue
        event = next((e for e in reversed(callback.events) if e.kind is EventKind.STALL), None)
        if event is None:
            return None
        value = trainer.callback_metrics.get(event.monitor)
        if value is None:
            return event
        return None if out_of_stall(float(value), event, callback.mode) else event
    return None


class EpochProgressBar(ProgressBar):
    """A progress bar over epochs, not batches: epoch, the metrics logged with ``prog_bar=True``
    (``train/loss``...) and, while a stall is open, its diagnosis and the last escape action.

    Lightning's ``TQDMProgressBar`` draws one bar per epoch and refreshes it per batch: for a
    full-batch run of 2000 one-step epochs that is 2000 bars, and its per-epoch cost is a large part of
    a 1 ms step. This bar is one line for the whole fit, redrawn at most every ``refresh_seconds``
    (and at the end), so it costs next to nothing. Validation, test and predict show no bar.

    Args:
        refresh_seconds: Least time between two redraws.

    Example::

        from src.callbacks import EpochProgressBar
        trainer = Trainer(max_epochs=2000, callbacks=[EpochProgressBar()])
    """

    def __init__(self, refresh_seconds: float = 0.5) -> None:
        super().__init__()
        if not refresh_seconds >= 0:
            raise ValueError(f"EpochProgressBar: refresh_seconds must be >= 0, got {refresh_seconds}")
        self.refresh_seconds = refresh_seconds
        self._enabled = True
        self._bar: Any = None
        self._last_draw = -math.inf

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @override
    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.write(" ".join(map(str, args)), file=sys.stderr)
        else:
            print(*args, **kwargs)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Lightning's messages (a stall, an escape action) are printed above the bar, not into it.
        self._redirect = logging_redirect_tqdm([logging.getLogger("lightning.pytorch")])
        self._redirect.__enter__()
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self._bar = tqdm(
            total=total, initial=trainer.current_epoch, desc="fit", unit="epoch", dynamic_ncols=True, file=sys.stderr
        )
        self._last_draw = -math.inf

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Read the epoch's metrics on every process, not only where the bar is drawn: the first read
        # computes them, and a metric logged with sync_dist=True then runs a collective. Lightning
        # computes them at the epoch's end anyway, so this costs nothing; a read on rank 0 alone
        # would start a collective that the other ranks meet with a different one (a mismatch).
        trainer.progress_bar_metrics  # noqa: B018
        now = time.monotonic()
        if self._bar is not None and now - self._last_draw >= self.refresh_seconds:
            self._draw(trainer, pl_module, epochs_done=trainer.current_epoch + 1)
            self._last_draw = now

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._draw(trainer, pl_module, epochs_done=trainer.current_epoch, refresh=False)  # close() draws it
            self._close()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._bar is not None:
            self._close()

    def _close(self) -> None:
        self._bar.close()
        self._bar = None
        self._redirect.__exit__(None, None, None)

    def postfix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        """What follows the bar: the progress-bar metrics and the open stall, if any."""
        shown = {key: f"{value:.4g}" if isinstance(value, float) else str(value)
                 for key, value in self.get_metrics(trainer, pl_module).items() if key != "v_num"}  # fmt: skip
        stall = open_stall(trainer)
        if stall is not None:
            what = stall.diagnosis or "stall"
            last = f", {stall.actions[-1].action}" if stall.actions else ""
            shown["stall"] = f"{what} since epoch {stall.epoch}{last}"
        return shown

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, epochs_done: int, refresh: bool = True) -> None:
        self._bar.n = epochs_done
        self._bar.set_postfix(self.postfix(trainer, pl_module), refresh=False)
        if refresh:
            self._bar.refresh()
