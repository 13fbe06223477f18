"""The benchmark command runs and prints its table (figures are not asserted: no timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_benchmark_suite_quick_run_prints_every_row(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--quick", "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (
        "1. toy", "the same without self.log", "bare Trainer.fit", "2. GradNormMonitor every 10", "3. template",
        "3. bare Trainer.fit", "in CPU time", "3. data only", "4. python -m src.train --help",
    )  # fmt: skip
    for row in rows:
        assert row in result.stdout, result.stdout
    figures = json.loads(out.read_text())
    assert figures["results"]["1 toy fit"]["plain"][0] > 0


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from Linux's /proc")
def test_peak_rss_is_measured_inside_the_child_not_inherited_from_the_parent(tmp_path):
    import torch

    from benchmarks.mnist_pipeline import peak_rss_of_train

    ballast = torch.ones(256 * 2**20 // 4)  # this process now holds 256 MiB more than a --help needs
    ballast += 1
    with open("/proc/self/status") as status:
        parent_mib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    peak = peak_rss_of_train(["--help"], tmp_path)  # answered without importing torch
    assert 1 < peak < 100 < parent_mib, (peak, parent_mib)
