"""Shared fixtures: running the real CLI in a subprocess, and the repository's paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None):
    """Run ``python -m src.train ARGS`` from ``cwd`` (outside the repo) and return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("TEMPLATE_DEBUG", None)
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
