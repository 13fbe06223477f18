"""Shared fixtures: the CLI in-process (``main``) or in a subprocess (``cli``), loggers, the repository's paths."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
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


@pytest.fixture
def cli(tmp_path: Path):
    """Call as ``cli("fit", "--trainer.max_epochs", "2")``; runs in a fresh temporary directory."""

    def _run(*args: str, **kwargs):
        return run_cli(*args, cwd=tmp_path, **kwargs)

    _run.cwd = tmp_path
    return _run


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


@pytest.fixture
def main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Call as ``main("fit", "--trainer.max_epochs", "2")``: ``src.cli.main`` in this process, from a
    fresh temporary directory (or ``cwd=``), with its exit status and what it wrote (``returncode``,
    ``stdout``, ``stderr``).

    The entry function itself, so the exit status and the one ``error:`` line are the real ones;
    only the process around it is shared. Use ``cli`` where the process is what is tested.
    """
    from src.cli import main as cli_main

    monkeypatch.delenv("TEMPLATE_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["python -m src.train"])  # main rewrites sys.argv[1:], as DDP needs

    def _run(*args: str, cwd: Path | None = None) -> SimpleNamespace:
        monkeypatch.chdir(cwd or tmp_path)
        return call_entry(cli_main, args, capsys)

    _run.cwd = tmp_path
    return _run


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


@pytest.fixture
def http_dir(tmp_path_factory):
    """A folder served over http on a free loopback port: ``.directory`` (a Path) and ``.url``."""
    directory = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(directory=directory, url=f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()
