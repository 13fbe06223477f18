"""The benchmark command runs and prints its table (figures are not asserted: no timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_benchmark_suite_quick_run_prints_every_row(tmp_path):
    out = tmp_path / "figures.json"
    result = run_module("benchmarks.suite", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (
        "1. toy", "the same without self.log", "bare Trainer.fit", "2. GradNormMonitor every 10", "3. template",
        "3. bare Trainer.fit", "in CPU time", "3. data only", "4. python -m src.train --help",
        "7. a study run's epoch (vanishing.yaml", "bare Trainer.fit, the same depth-18 net", "trust_ratio_), depth 18",
    )  # fmt: skip
    for row in rows:
        assert row in result.stdout, result.stdout
    figures = json.loads(out.read_text())
    assert figures["results"]["1 toy fit"]["plain"][0] > 0
    assert set(figures["results"]["7 study run"]) == {"study run", "bare", "bare + logging", "plain"}


@pytest.mark.slow
def test_rows_picks_the_rows_the_suite_measures():
    result = run_module("benchmarks.suite", "--quick", "--rows", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2. GradNormMonitor every step" in result.stdout and "2b. EpochProgressBar" in result.stdout
    assert "per logged step, the norms" in result.stdout and "per logged step, the logger: 16 scalars" in result.stdout
    for absent in ("1. toy", "3. template", "4. python", "5. peak RSS", "6. GPU", "7. a study"):
        assert absent not in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_gpu_rows_without_cuda_say_so_in_one_line():
    result = run_module("benchmarks.mnist_pipeline", "--accelerator", "gpu", "--no-rss")
    assert result.returncode == 2
    assert "--accelerator gpu needs a CUDA device" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU rows need CUDA")
def test_gpu_rows_train_on_the_gpu_in_float32_and_bf16():
    from benchmarks.mnist_pipeline import measure

    figures = measure(["--repeats", "1", "--limit", "2000", "--no-rss", "--no-torchvision", "--accelerator", "gpu"])
    rows = figures["samples_per_s"]
    assert "template (Trainer + MNISTDataModule) on gpu" in rows
    assert "template, bf16-mixed (configs/trainer/gpu.yaml)" in rows
    assert not any("torchvision" in name for name in rows)
    assert all(rate[0] > 0 for rate in rows.values())


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


def test_the_stall_zoo_table_pairs_each_run_with_and_without_the_policy_and_the_fix():
    from benchmarks.stall_zoo import cell_facts, table

    def row(variant, policy, seed, loss, epoch=""):
        return {"variant": variant, "policy": policy, "seed": seed, "final_loss": loss, "epoch_below_0.05": epoch}

    rows = [
        row("xor_sigmoid_sgd", "none", 0, 0.69), row("xor_sigmoid_sgd", "default", 0, 0.01, 300),
        row("xor_sigmoid_sgd", "none", 1, 0.69), row("xor_sigmoid_sgd", "default", 1, 0.70),  # stalled, not freed
        row("xor_sigmoid_sgd_fix", "none", 0, 0.0042, 40), row("xor_sigmoid_sgd_fix", "none", 1, 0.35),
        # the fix with the policy: both stopped as converged (below 0.01) at seed 0; at seed 1 above the run without
        row("xor_sigmoid_sgd_fix", "default", 0, 0.0064, 30), row("xor_sigmoid_sgd_fix", "default", 1, 0.48),
        row("blobs_tanh_adam", "none", 0, 0.01, 90), row("blobs_tanh_adam", "default", 0, float("nan")),  # diverged
    ]  # fmt: skip
    facts = cell_facts(rows, target=0.05, stalled_above=0.3, converged=0.01)
    assert [(f["cell"], f["stalled"], f["reached"], f["worse"], f["fix_worse"]) for f in facts] == [
        ("blobs_tanh_adam", False, False, True, None),  # no fix twin
        ("xor_sigmoid_sgd", True, True, False, False),
        ("xor_sigmoid_sgd", True, False, True, True),  # 0.70 > 0.69 * 1.01: made worse; the fix 0.48 > 0.35
    ]
    text = table(facts)
    assert "| xor_sigmoid_sgd | 2/2 | 1/2 | 300 | 40 | 7.5x | 1/2 | 1/2 |" in text  # 300 epochs against the fix's 40
    assert "| blobs_tanh_adam | 0/1 | 0/0 | - | - | - | 1/1 | - |" in text
    assert "| adam | 0/0 | 1/1 |" in text and "| sgd | 1/2 | 1/2 |" in text and "| xor | 1/2 | 1/2 |" in text
    assert text.endswith(
        "All: 1/2 stalled runs freed, 2/3 made worse; fix runs made worse: 1/2; to the target within 3x of the fix's"
        " time in 0 of 1 cells."
    )
    # without the study's stop_below, the converged pair counts as made worse
    assert [f["fix_worse"] for f in cell_facts(rows, target=0.05, stalled_above=0.3)] == [None, True, True]


def test_the_stall_zoo_reads_the_summary_of_the_study_it_is_given(tmp_path, capsys):
    from benchmarks.stall_zoo import main

    header = "policy,variant,seed,final_loss,epoch_below_0.05\n"
    rows = ["none,xor_tanh_d10_w8_sgd_b32,0,0.69,", "default,xor_tanh_d10_w8_sgd_b32,0,0.004,120"]
    summary = tmp_path / "summary.csv"
    summary.write_text(header + "\n".join(rows) + "\n")
    study = "configs/study/stall_zoo_minibatch.yaml"  # its targets: stalled above 0.3, solved below 0.05
    assert main(["--study", study, "--summary", str(summary)]) == 0
    assert "| xor_tanh_d10_w8_sgd_b32 | 1/1 | 1/1 | 120 |" in capsys.readouterr().out
    assert main(["--study", str(tmp_path / "missing.yaml"), "--summary", str(summary)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'missing.yaml'}: no such study file (see configs/study/vanishing.yaml)\n"
    )
