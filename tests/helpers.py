"""What tests share besides fixtures: the repository's paths, the CLI in a subprocess or in this
process, an in-memory logger and a quiet Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None):
    """Run ``python -m src.train ARGS`` from ``cwd`` (outside the repo) and return the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "TEMPLATE_DEBUG"}
    full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call_entry(
    entry: Callable[[list[str]], int | None], args: Sequence[str], capsys: pytest.CaptureFixture
) -> SimpleNamespace:
    """Call a ``main(argv)`` entry function in this process: the exit status its process would have
    (what it returns, or ``SystemExit``'s code) and what it wrote (``returncode``, ``stdout``, ``stderr``)."""
    capsys.readouterr()
    try:
        code = entry(list(args)) or 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


class MemoryLogger(L.pytorch.loggers.Logger):
    """Keeps every logged scalar as ``metrics[name] = [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))


def quiet_trainer(**kwargs) -> L.Trainer:
    """A Trainer for tests: no progress bar, summary or checkpoints unless asked for."""
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


class StopAfter(L.Callback):
    """Ends the fit after epoch ``epoch``, as an interruption would: a checkpoint saved at that epoch's end is
    resumed with the same ``max_epochs`` (PlateauEscape takes no action it could not judge before the fit's end,
    so a fit made shorter by its ``max_epochs`` is not the first half of a longer one)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = trainer.should_stop or trainer.current_epoch == self.epoch
