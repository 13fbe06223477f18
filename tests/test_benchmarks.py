"""The benchmark command runs and prints its table (figures are not asserted: no timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


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
