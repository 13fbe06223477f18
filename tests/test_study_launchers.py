"""python -m src.study on either launcher: the same results, resume, failed runs, Ctrl+C, bad input."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.study.cli import main
from tests.helpers import REPO, call_entry

STUDY = """\
base_config: {repo}/configs/dnnex.yaml
variants:
  small: {small}
  {extra}
seeds: [0, 1]
config:
  trainer: {{max_epochs: {epochs}, enable_checkpointing: false, callbacks: []}}
stalled_above: null
solved_below: null
"""


def study_file(
    tmp_path: Path, epochs: int = 3, extra: str = "wide: {model.width: 4}", small: str = "{model.width: 2}"
) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(repo=REPO, epochs=epochs, extra=extra, small=small))
    return path


def summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def study(capsys, *args: str):
    return call_entry(main, [*args, "--workers", "2"], capsys)


def test_a_second_run_skips_the_finished_runs_and_a_deleted_result_reruns_only_that_one(tmp_path, capsys):
    path, out = study_file(tmp_path), tmp_path / "out"
    first = study(capsys, str(path), "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = summary(out)
    assert len(before) == 4
    again = study(capsys, str(path), "--out", str(out))
    assert again.returncode == 0 and "0 runs on" in again.stdout and "4 finished before: kept" in again.stdout
    assert summary(out) == before  # the rows from the first run are kept as they were
    (out / "runs" / "small_s1" / "result.json").unlink()
    third = study(capsys, str(path), "--out", str(out))
    assert "1 runs on" in third.stdout and "[1/1] small_s1: final loss" in third.stdout
    assert {k: v["final_loss"] for k, v in summary(out).items()} == {k: v["final_loss"] for k, v in before.items()}
    rerun = study(capsys, str(path), "--out", str(out), "--rerun")
    assert "4 runs on" in rerun.stdout


@pytest.mark.parametrize("launcher", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_failing_run_is_a_row_marked_failed_and_the_others_go_on(tmp_path, capsys, launcher):
    path = study_file(tmp_path, extra="broken: {data.init_args.csv_path: /nonexistent/dnnex.csv}")
    out = tmp_path / "out"
    result = study(capsys, str(path), "--out", str(out), "--launcher", launcher)
    assert result.returncode == 0, result.stderr
    rows = summary(out)
    assert [rows[f"broken_s{s}"]["status"] for s in (0, 1)] == ["failed", "failed"]
    assert "/nonexistent/dnnex.csv" in rows["broken_s0"]["error"] and "\n" not in rows["broken_s0"]["error"]
    assert rows["small_s0"]["final_loss"] != "" and rows["small_s0"]["status"] == ""
    assert "broken_s0: FAILED (" in result.stdout
    assert "| failed |" in (out / "summary.md").read_text()
    assert not (out / "runs" / "broken_s0" / "result.json").exists()  # not finished: a re-run tries it again


@pytest.mark.slow
def test_ray_gives_the_same_final_losses_as_the_process_pool(tmp_path, capsys):
    path = study_file(tmp_path, epochs=20)
    for launcher in ("local", "ray"):
        result = study(capsys, str(path), "--out", str(tmp_path / launcher), "--launcher", launcher)
        assert result.returncode == 0, result.stderr
    local, ray = summary(tmp_path / "local"), summary(tmp_path / "ray")
    assert {k: v["final_loss"] for k, v in local.items()} == {k: v["final_loss"] for k, v in ray.items()}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_keeps_the_finished_runs_and_says_how_to_resume(tmp_path, signum):
    # the small runs finish in seconds; the wide ones would take an hour: one is in flight at the signal
    path = study_file(tmp_path, epochs=100_000, small="{model.width: 2, trainer.max_epochs: 3}")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "src.study", str(path), "--out", str(out), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(out.glob("runs/*/result.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(out.glob("runs/*/result.json"))) == 2, "the small runs did not finish in time"
    time.sleep(1)  # the first wide run is under way
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert children  # the pool's worker (and its resource tracker)
    process.send_signal(signum)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:  # a study that hangs must not outlive the test, nor its workers
        process.kill()
        subprocess.run(["kill", "-9", *children], capture_output=True)
    assert process.returncode == 130, stderr
    assert "interrupted: " in stderr and "run the same command again" in stderr
    finished = {p.parent.name for p in out.glob("runs/*/result.json")}
    assert finished == {"small_s0", "small_s1"} and set(summary(out)) == finished
    time.sleep(2)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
    assert alive == []  # the worker running a run was stopped with the study, not left behind


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--launcher", "slurm"], "--launcher must be one of local, ray, got 'slurm'"),
        (["--launcher", "ray", "--address", "127.0.0.1:9"], "--address 127.0.0.1:9: nothing answers there"),
        (["--launcher", "ray", "--address", "nohost"], "--address must be host:port"),
        (["--cpus-per-run", "0"], "--cpus-per-run must be >= 1, got 0"),
        (["--address", "auto"], "--address is for --launcher ray"),
    ],
)
def test_bad_launcher_input_is_one_line_exit_2_and_no_output_folder(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    start = time.monotonic()
    result = study(capsys, str(study_file(tmp_path)), "--out", str(out), *args)
    assert result.returncode == 2 and time.monotonic() - start < 30
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_without_ray_the_line_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    out = tmp_path / "out"
    result = study(capsys, str(study_file(tmp_path)), "--out", str(out), "--launcher", "ray")
    assert result.returncode == 2 and "pip install -e '.[ray]'" in result.stderr and not out.exists()
