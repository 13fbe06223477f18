"""Shared fixtures: the CLI in-process (``main``) or in a subprocess (``cli``), a served folder. Helpers: helpers.py."""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import call_entry, run_cli


@pytest.fixture
def cli(tmp_path: Path):
    """Call as ``cli("fit", "--trainer.max_epochs", "2")``; runs in a fresh temporary directory."""

    def _run(*args: str, **kwargs):
        return run_cli(*args, cwd=tmp_path, **kwargs)

    _run.cwd = tmp_path
    return _run


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
