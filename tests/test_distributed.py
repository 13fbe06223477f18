"""Several processes and several machines, through Lightning's own DDP (CPU here; GPU where there is one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.callbacks.events import load_events
from tests.helpers import REPO, run_cli

CONFIGS = REPO / "configs"
DDP = ("--config", str(CONFIGS / "default.yaml"), "--config", str(CONFIGS / "trainer" / "ddp.yaml"))
needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="2 CPU processes need 2 cores")


@pytest.mark.slow
@needs_two_cores
def test_ddp_preset_runs_the_default_experiment_on_two_cpu_processes(tmp_path):
    result = run_cli(
        "fit", *DDP, "--trainer.accelerator", "cpu", "--trainer.max_epochs", "300",
        "--trainer.callbacks+=tests.ddp_probe.DumpRankState", "--trainer.callbacks+=tests.ddp_probe.DumpMetrics",
        cwd=tmp_path, env={"RANK_STATE_DIR": str(tmp_path)}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # one set of logs and checkpoints, written by rank 0
    runs = list((tmp_path / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 1
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file() and (runs[0] / "stall_events.json").is_file()
    assert result.stdout.count("Finished after 300 epochs") == 1
    # metrics synced, the escape applied alike, parameters identical
    metrics = [torch.load(tmp_path / f"metrics{r}.pt") for r in (0, 1)]
    assert metrics[0] == metrics[1] and "train/loss" in metrics[0] and "val/acc" in metrics[0]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert states[0]["spent"] >= 1 and states[0]["spent"] == states[1]["spent"]
    assert states[0]["param_groups"] == states[1]["param_groups"]
    assert torch.equal(states[0]["weights"], states[1]["weights"])
    # each rank's activations are of its own half of the data: the shares are averaged over the ranks
    assert states[0]["layer_stats_step"] == states[1]["layer_stats_step"] == 290
    assert len(states[0]["layer_stats"]) == 7 and states[0]["layer_stats"] == states[1]["layer_stats"]


@pytest.mark.slow
@needs_two_cores
def test_lightnings_own_progress_bar_with_the_detector_under_ddp(tmp_path):
    """Lightning's TQDMProgressBar reads the epoch's metrics on rank 0 only, which runs their
    sync_dist collectives there; the detector (checked after the module's epoch end) and GracefulStop
    run collectives of their own: every rank must still run the same ones in the same order."""
    callbacks = (
        "[{class_path: src.callbacks.GradNormMonitor}, {class_path: src.callbacks.PlateauDetector, "
        "init_args: {patience: 30}}, {class_path: src.callbacks.PlateauEscape}, "
        "{class_path: lightning.pytorch.callbacks.TQDMProgressBar}]"
    )
    result = run_cli("fit", *DDP, "--trainer.accelerator", "cpu", "--trainer.max_epochs", "80",
                     f"--trainer.callbacks={callbacks}", cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stall, diagnosis" in result.stdout and result.stdout.count("Finished after 80 epochs") == 1


def write_replacing_policy(tmp_path: Path, action: str = "replace_units") -> None:
    """``policy.yaml``: a scripted stall every 3 epochs (no epoch improves the loss by half), each
    answered by re-placing units (``action``: the idle or pinned ones, or with ``recycle`` each
    layer's weakest; on every stall: no probation), and the probe that dumps each rank's state."""
    (tmp_path / "policy.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - {class_path: src.callbacks.PlateauDetector, init_args: {patience: 3, min_delta: 0.5}}\n"
        "    - class_path: src.callbacks.PlateauEscape\n"
        f"      init_args: {{actions: {{any: [{{{action}: true, repeat: true}}]}}, probation: null}}\n"
        "    - tests.ddp_probe.DumpRankState\n"
    )


def fit_under_ddp(tmp_path: Path, *args: str) -> list:
    """``fit`` of the default config with ``policy.yaml`` on two CPU processes, each dumping its state
    into ``tmp_path``; the run's stall events."""
    result = run_cli(
        *DDP, "--config", "policy.yaml", "--trainer.accelerator", "cpu", *args,
        cwd=tmp_path, env={"RANK_STATE_DIR": str(tmp_path)}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return load_events(tmp_path / "lightning_logs" / "version_0" / "stall_events.json")


def taken(events: list) -> list[str]:
    """The actions the events record, less the stalls the fit ended too soon after to judge one."""
    return [a.action for e in events for a in e.actions if not a.action.startswith("none: ")]


def assert_ranks_agree(tmp_path: Path, events: list) -> list[dict]:
    """Both ranks' dumped states (``tests.ddp_probe.DumpRankState``): the same actions taken (one per
    event, but where the fit ends too soon after it to judge one; two or more), the same weights and the
    same optimizer state. Returns them."""
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert states[0]["spent"] == states[1]["spent"] == len(taken(events)) >= 2
    assert torch.equal(states[0]["weights"], states[1]["weights"])
    for a, b in zip(states[0]["optimizer_state"], states[1]["optimizer_state"], strict=True):
        assert torch.equal(a, b)
    return states


@pytest.mark.slow
@needs_two_cores
def test_re_placed_units_are_the_same_on_both_ranks(tmp_path):
    """Each rank sees its own half of the data, so each would put a new kink on its own points:
    rank 0's weights go to every rank, and the optimizer state is reset alike."""
    write_replacing_policy(tmp_path)
    result = run_cli(
        "fit", "--config", str(CONFIGS / "dnnex.yaml"), "--config", str(CONFIGS / "trainer" / "ddp.yaml"),
        "--config", "policy.yaml", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "11",
        "--model.width", "8", "--data.init_args.n_samples", "200",
        cwd=tmp_path, env={"RANK_STATE_DIR": str(tmp_path)}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    events = load_events(tmp_path / "lightning_logs" / "version_0" / "stall_events.json")
    replaced = taken(events)
    # the first stall re-places units; a later stall may find none left idle, and says so
    assert replaced and replaced[0].startswith("re-place idle units: net.layers.0 ["), replaced
    assert all(a.startswith("re-place idle units: ") for a in replaced), replaced
    states = assert_ranks_agree(tmp_path, events)
    # dnnex has two layers; each rank saw its own half of the data: the statistics are averaged over the ranks
    assert states[0]["layer_stats_step"] == states[1]["layer_stats_step"]
    assert len(states[0]["layer_stats"]) == 2 and states[0]["layer_stats"] == states[1]["layer_stats"]


@pytest.mark.slow
@needs_two_cores
def test_re_placed_pinned_sigmoid_units_are_the_same_on_both_ranks(tmp_path):
    """Weights drawn from N(0, 1) on inputs of ~8 pin the first sigmoid layer's units: each rank finds
    them on its own half of the data (the shares are averaged over the ranks) and re-places them
    from rank 0's weights, the folded bias and the zeroed optimizer state alike."""
    write_replacing_policy(tmp_path)
    events = fit_under_ddp(
        tmp_path, "--trainer.max_epochs", "12",
        "--model.depth", "3", "--model.init", "normal", "--optimizer.init_args.momentum", "0.9",
    )  # fmt: skip
    assert events[0].diagnosis and events[0].units and "saturated" in events[0].units["net.layers.0"]
    assert events[0].actions[0].action.startswith("re-place idle units: net.layers.0 [")
    assert_ranks_agree(tmp_path, events)


@pytest.mark.slow
@needs_two_cores
def test_each_layers_weakest_unit_is_the_same_on_both_ranks(tmp_path):
    """Each rank weighs its units on its own half of the data: the utilities are averaged over the
    ranks, so both pick the same unit, and rank 0's new weights go to every rank."""
    write_replacing_policy(tmp_path, action="recycle")
    events = fit_under_ddp(
        tmp_path, "--trainer.max_epochs", "12",
        "--model.depth", "3", "--optimizer.init_args.momentum", "0.9",
    )  # fmt: skip
    actions = taken(events)
    assert actions and all(a.startswith("re-place each layer's weakest unit: net.layers.0 [") for a in actions)
    assert_ranks_agree(tmp_path, events)


@pytest.mark.slow
@needs_two_cores
def test_the_step_rule_decides_alike_on_both_ranks(tmp_path):
    """Mini-batches (each rank its own half of every global batch of 1000): the step losses are
    averaged over the ranks before the line is fitted, so both ranks report the same stalls at the
    same steps and take the same actions."""
    (tmp_path / "policy.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - {class_path: src.callbacks.PlateauDetector, init_args: {step_window: 30}}\n"
        "    - {class_path: src.callbacks.PlateauEscape, init_args: {actions: [{momentum: 0.5}, {momentum: 0.6}]}}\n"
        "    - tests.ddp_probe.DumpRankState\n"
    )
    events = fit_under_ddp(
        tmp_path, "--trainer.max_epochs", "5",
        "--data.init_args.n_samples", "20000", "--data.init_args.batch_size", "1000",
        "--optimizer.init_args.lr", "1e-9", "--trainer.check_val_every_n_epoch", "10",
    )  # fmt: skip
    # mid-epoch: 20 steps an epoch; at step 90 every action is spent
    assert [(e.epoch, e.step) for e in events] == [(1, 30), (2, 60), (4, 90)]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert states[0]["spent"] == states[1]["spent"] == 2  # both actions, each with its window to be judged
    assert states[0]["event_values"] == states[1]["event_values"]  # the window's mean over both ranks
    assert torch.equal(states[0]["weights"], states[1]["weights"])


def test_a_global_batch_that_does_not_split_is_one_clear_error(tmp_path):
    result = run_cli(
        "fit", *DDP, "--trainer.accelerator", "cpu", "--data.init_args.batch_size", "5", "--trainer.max_epochs", "2",
        cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "data.batch_size=5" in errors[0] and "multiple of 2" in errors[0]


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_two_cores
def test_two_nodes_under_torchrun_with_lightnings_num_nodes(tmp_path):
    """Two "machines" on loopback: one torchrun per node, as on a real cluster, each with one process."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None
    port = free_port()
    args = [
        "-m", "src.train", "fit", *DDP, "--config", str(CONFIGS / "trainer" / "multinode.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
        "--trainer.max_epochs", "150", "--trainer.callbacks+=tests.ddp_probe.DumpRankState",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK_STATE_DIR": str(tmp_path)}

    def start(rank: int) -> subprocess.Popen:
        command = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), *args]  # fmt: skip
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    # node 0 hosts the rendezvous: start it first and let it listen before node 1 dials in
    nodes = [start(0)]
    deadline = time.monotonic() + 120
    while not port_is_open(port):
        assert nodes[0].poll() is None and time.monotonic() < deadline, nodes[0].communicate()[0][-3000:]
        time.sleep(0.2)
    nodes.append(start(1))
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # timed out: do not leave it behind
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "MEMBER: 2/2" in outputs[1]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(states[0]["weights"], states[1]["weights"])
    # each rank's activations are of its own half of the data: the shares are averaged over the ranks
    assert states[0]["layer_stats_step"] == states[1]["layer_stats_step"]
    assert len(states[0]["layer_stats"]) == 7 and states[0]["layer_stats"] == states[1]["layer_stats"]
    assert [r.name for r in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_gpu_preset_trains_and_its_checkpoint_loads_on_cpu(tmp_path):
    result = run_cli(
        "fit", "--config", str(CONFIGS / "default.yaml"), "--config", str(CONFIGS / "trainer" / "gpu.yaml"),
        "--trainer.max_epochs", "20", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    result = run_cli(
        "test", "--config", str(CONFIGS / "default.yaml"), "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--ckpt_path", str(ckpt), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout
