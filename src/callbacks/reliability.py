"""Safe to leave running: stop on SIGTERM/SIGINT at an epoch boundary, never checkpoint NaN weights."""

from __future__ import annotations

import inspect
import signal
import threading
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from .plateau_rule import StallReporter


class GracefulStop(Callback):
    """On SIGTERM or SIGINT (Ctrl+C) finish the current epoch, then stop as if ``max_epochs`` were reached.

    The run then ends normally, so a ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` at an
    epoch boundary (Lightning writes it to a temporary file and renames it: a kill during the write
    leaves the previous one intact) and ``fit --ckpt_path last`` resumes exactly. A second signal
    falls back to what the signal did before (Ctrl+C then interrupts at once, with no checkpoint).
    Under DDP the decision is reduced over the processes, so one rank's signal stops them all at the
    same epoch. Handlers are installed at train start and the previous ones restored at the end;
    they can only be installed from the main thread, elsewhere this callback does nothing.

    ``stopped_by`` holds the signal's name once it has stopped a run.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        super().__init__()
        unknown = [name for name in signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"GracefulStop: unknown signal(s) {unknown}; use names such as SIGTERM, SIGINT, SIGUSR1")
        self.signals = tuple(signals)
        self.requested: str | None = None
        self.stopped_by: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.requested is not None:  # a second signal: do what it did before
            self._restore()
            previous = signal.getsignal(sig)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(sig)
            return
        self.requested = sig.name
        rank_zero_info(f"\nReceived {sig.name}: stopping after this epoch with a resumable last.ckpt (again to abort)")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = self.stopped_by = None
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            # A progress bar draws on rank 0 only, and its first read of the epoch's metrics runs their
            # sync_dist collectives there. Read them on every rank before this process's own
            # collective, so that each rank runs the same collectives in the same order.
            trainer.callback_metrics  # noqa: B018
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            self.stopped_by = self.requested or "a signal to another process"
            trainer.should_stop = True

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


def weights_are_finite(module: torch.nn.Module) -> bool:
    params = [p.detach() for p in module.parameters()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes nothing once the run has diverged.

    A save is skipped while the model holds NaN/inf weights, or after a callback on the Trainer (a
    :class:`~.plateau_rule.StallReporter`, such as the PlateauDetector) has reported a divergence.
    The checkpoints on disk, ``last.ckpt`` included, are then all from before the divergence, and
    resuming from them restarts a healthy run. ``skipped`` counts the refused saves and
    ``saved_epoch`` is the epoch of the newest checkpoint written.

    It overrides ``ModelCheckpoint._save_checkpoint``, a protected method: Lightning has no public
    hook that can veto one save, and every save (top-k, last, on schedule) goes through it.

    ``ModelCheckpoint`` deep-copies every logged metric at each training epoch end before it looks at
    its schedule (~0.3 ms: 8% of a full-batch toy run). With a schedule of epochs only, given as its
    arguments (``every_n_epochs`` >= 1, no ``every_n_train_steps`` or ``train_time_interval``, and
    ``save_last`` not ``"link"``), an epoch end that is not due and follows no save at its step can
    write nothing, and this callback skips it. Anything else goes to ``ModelCheckpoint`` as it is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = 0
        self.saved_epoch: int | None = None
        self._saved_step: int | None = None
        given = inspect.signature(ModelCheckpoint.__init__).bind(self, *args, **kwargs).arguments
        every = given.get("every_n_epochs")
        epochs_only = not given.get("every_n_train_steps") and given.get("train_time_interval") is None
        self._every_n_epochs_given = every if isinstance(every, int) and every >= 1 and epochs_only else None
        if given.get("save_last") == "link":
            self._every_n_epochs_given = None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self._every_n_epochs_given
        if every is not None and (trainer.current_epoch + 1) % every and self._saved_step != trainer.global_step:
            return  # not due, and no save at this step for last.ckpt to follow: nothing to write
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        diverged = any(cb.diverged for cb in trainer.callbacks if isinstance(cb, StallReporter))
        if diverged or not weights_are_finite(trainer.lightning_module):
            if not self.skipped:
                why = "the run has diverged" if diverged else "the model's weights are not finite"
                rank_zero_warn(f"{why}: not writing {filepath} (nor later checkpoints)")
            self.skipped += 1
            return
        super()._save_checkpoint(trainer, filepath)
        self.saved_epoch, self._saved_step = trainer.current_epoch, trainer.global_step
