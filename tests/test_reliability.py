"""Safe to leave running: kill and resume, divergence, checkpoints that are never torn or NaN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from src.callbacks import FiniteModelCheckpoint, GracefulStop
from src.checkpoints import resolve_ckpt_path
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import REPO, quiet_trainer

# A toy run paced to ~10 ms an epoch, so that a signal lands mid-run.
PACED = ("--trainer.callbacks+=tests.ddp_probe.Pace",)


def start_cli(*args: str, cwd: Path, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RUN_MARKER": str(marker)}
    env.pop("TEMPLATE_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "src.train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    return checkpoint["state_dict"], checkpoint


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_from_last_equals_an_uninterrupted_run(tmp_path, main):
    epochs = ("--trainer.max_epochs", "700", "--trainer.deterministic", "true")
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    interrupted.mkdir()
    straight.mkdir()
    # the signal needs a real process, paced so that it lands mid-run; the rest runs in this one, unpaced
    process = start_cli("fit", *epochs, *PACED, cwd=interrupted, marker=tmp_path / "m")
    wait_for(tmp_path / "m", process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Stopped by SIGTERM" in out and "--ckpt_path last" in out
    last = interrupted / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    _, stopped = final_weights(last)
    assert 10 <= stopped["epoch"] < 699  # stopped at an epoch boundary, mid-run
    assert not list(last.parent.glob("*.tmp*"))

    resumed = main("fit", *epochs, "--ckpt_path", "last", cwd=interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (interrupted / "lightning_logs" / "version_1").exists()  # went on in its own run directory
    baseline = main("fit", *epochs, cwd=straight)
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    weights, resumed_ckpt = final_weights(last)
    expected, baseline_ckpt = final_weights(straight / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert resumed_ckpt["global_step"] == baseline_ckpt["global_step"] == 700
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    # the optimizer (momentum switched by the escape) and the callbacks' state came along too
    assert resumed_ckpt["optimizer_states"][0]["param_groups"][0]["momentum"] == pytest.approx(
        baseline_ckpt["optimizer_states"][0]["param_groups"][0]["momentum"]
    )
    escape_key = next(k for k in baseline_ckpt["callbacks"] if k.startswith("PlateauEscape"))
    assert resumed_ckpt["callbacks"][escape_key]["spent"] == baseline_ckpt["callbacks"][escape_key]["spent"] > 0


@pytest.mark.slow
def test_ctrl_c_stops_at_the_epoch_end_with_a_resumable_checkpoint(tmp_path):
    process = start_cli("fit", "--trainer.max_epochs", "5000", *PACED, cwd=tmp_path, marker=tmp_path / "m")
    wait_for(tmp_path / "m", process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and "Stopped by SIGINT" in out
    _, checkpoint = final_weights(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert (
        checkpoint["epoch"] >= 10
        and checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == (checkpoint["epoch"])
    )


def test_divergence_stops_naming_the_epoch_and_keeps_the_checkpoint_from_before(main):
    result = main("fit", "--optimizer.init_args.lr", "1e6", "--checkpoint.every_n_epochs", "1")
    assert result.returncode == 1
    assert "DIVERGED at epoch 1: train/loss" in result.stdout and "lower the learning rate" in result.stdout
    ckpt = main.cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state, checkpoint = final_weights(ckpt)
    assert checkpoint["epoch"] == 0 and all(torch.isfinite(t).all() for t in state.values())


def test_nan_weights_are_never_checkpointed(tmp_path):
    model = MLPClassifier(in_features=2, num_classes=2, depth=2, width=4)
    checkpoint = FiniteModelCheckpoint(dirpath=tmp_path)
    trainer = quiet_trainer(max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.strategy.connect(model)
    with torch.no_grad():
        model.net.layers[0].weight[0, 0] = float("nan")
    checkpoint._save_checkpoint(trainer, str(tmp_path / "nan.ckpt"))
    assert not (tmp_path / "nan.ckpt").exists() and checkpoint.skipped == 1


def test_graceful_stop_rejects_unknown_signals():
    with pytest.raises(ValueError, match="SIGNOPE"):
        GracefulStop(signals=("SIGNOPE",))


def test_ckpt_path_last_finds_the_newest_run_and_its_version(tmp_path):
    for version, age in ((0, 100), (3, 50), (7, 0)):
        ckpt = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        torch.save({"x": 1}, ckpt)
        os.utime(ckpt, (time.time() - age, time.time() - age))
    (tmp_path / "lightning_logs" / "version_9").mkdir()  # a run that never checkpointed
    path, version = resolve_ckpt_path("last", tmp_path)
    assert path.endswith("version_7/checkpoints/last.ckpt") and version == 7
    with pytest.raises(FileNotFoundError, match="run fit first"):
        resolve_ckpt_path("last", tmp_path / "elsewhere")


@pytest.mark.parametrize("save_last", [True, "link"])
def test_finite_checkpoint_writes_what_model_checkpoint_writes_without_the_per_epoch_metric_copy(
    tmp_path, monkeypatch, save_last
):
    def fit(callback_class, dirpath):
        torch.manual_seed(0)
        model = MLPClassifier(in_features=2, num_classes=2, depth=2, width=4)
        checkpoint = callback_class(dirpath=dirpath, every_n_epochs=3, save_top_k=-1, save_last=save_last)
        quiet_trainer(max_epochs=7, callbacks=[checkpoint], enable_checkpointing=True, limit_val_batches=0).fit(
            model, datamodule=Toy2DDataModule()
        )
        return sorted(p.name for p in Path(dirpath).iterdir())

    copies = []
    original = ModelCheckpoint._monitor_candidates
    monkeypatch.setattr(
        ModelCheckpoint,
        "_monitor_candidates",
        lambda self, trainer: copies.append(trainer.current_epoch) or original(self, trainer),
    )
    expected = fit(ModelCheckpoint, tmp_path / "lightning")
    assert len(copies) >= 7  # Lightning's own callback copies the metrics at every epoch end
    copies.clear()
    assert fit(FiniteModelCheckpoint, tmp_path / "finite") == expected
    assert "last.ckpt" in expected and "epoch=5-step=6.ckpt" in expected
    if save_last is True:  # (with "link", Lightning updates the last.ckpt link at every epoch end)
        assert copies == [2, 5]  # only on the epochs that save


def test_the_cli_object_returns_a_divergence_as_its_exit_status_instead_of_exiting(tmp_path, monkeypatch):
    from src.cli import DEFAULT_CONFIG, TemplateCLI

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(DEFAULT_CONFIG), "--optimizer.init_args.lr", "1e6", "--trainer.max_epochs", "5",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = TemplateCLI(args=args)  # a notebook's call: a SystemExit here would end its kernel's cell
    assert cli.exit_status == 1 and cli.trainer.current_epoch < 5
