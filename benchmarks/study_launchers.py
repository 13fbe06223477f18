"""The study's two launchers side by side: Ray's start-up time, and one small grid's wall time with
1 and 2 workers on each (``python -m src.study``, a fresh output folder each time).

    python -m benchmarks.study_launchers [--epochs 300] [--seeds 4]

The grid is the default experiment (two clusters, plain SGD) at depths 2 and 4, ``--seeds`` seeds,
``--epochs`` epochs, no checkpoints: short runs, so that the launchers' own costs show. Each line
also says whether the final losses equal the local launcher's with one worker (they must: CPU,
deterministic).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = """\
base_config: {repo}/configs/default.yaml
depths: [2, 4]
seeds: {seeds}
config:
  trainer: {{max_epochs: {epochs}, enable_checkpointing: false}}
"""


def ray_start_seconds() -> float:
    """Seconds from ``ray.init()`` (a local instance, as the study starts it) until a task has run."""
    code = (
        "import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False, log_to_driver=False, num_cpus=1);"
        "ray.get(ray.remote(lambda: 1).remote()); print(time.perf_counter() - t); ray.shutdown()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def run_study(path: Path, out: Path, launcher: str, workers: int) -> tuple[float, dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "src.study", str(path), "--out", str(out), "--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run([*args, "--launcher", launcher], env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    with open(out / "summary.csv", newline="") as f:
        return seconds, {row["run"]: row["final_loss"] for row in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(STUDY.format(repo=REPO, seeds=list(range(args.seeds)), epochs=args.epochs))
        print(f"Ray start-up (ray.init to a first task's result): {ray_start_seconds():.1f} s")
        print(f"grid: depths 2 and 4 x {args.seeds} seeds, {args.epochs} epochs each\n")
        print("| launcher | workers | wall time (s) | speedup over 1 worker | same final losses |")
        print("| --- | --- | --- | --- | --- |")
        reference = None
        for launcher in ("local", "ray"):
            one = None
            for workers in (1, 2):
                seconds, losses = run_study(path, Path(tmp) / f"{launcher}{workers}", launcher, workers)
                reference = reference or losses
                one = one or seconds
                print(f"| {launcher} | {workers} | {seconds:.1f} | {one / seconds:.2f} | {losses == reference} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
