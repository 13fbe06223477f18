"""The command line end to end, as a user runs it: through its entry function, and as a process where
the process is the point (start-up without Lightning)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO

FAST = ("--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "1", "--checkpoint.every_n_epochs", "1")


def only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_train_fit_writes_events_config_and_checkpoints(main):
    result = main("fit", *FAST)
    assert result.returncode == 0, result.stderr
    run = only_run_dir(main.cwd)
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["depth"] == 7 and config["model"]["activation"] == "sigmoid"
    assert config["trainer"]["max_epochs"] == 3
    # the end-of-run summary
    assert "train loss" in result.stdout and "val   loss" in result.stdout
    assert str(run) in result.stdout
    assert "tensorboard --logdir" in result.stdout


def test_train_without_subcommand_runs_fit_with_the_default_config(main):
    result = main(*FAST)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((only_run_dir(main.cwd) / "config.yaml").read_text())
    assert config["data"]["class_path"] == "src.data.Toy2DDataModule"
    assert "Finished after 3 epochs" in result.stdout


def test_print_config_round_trips(main):
    first = main("fit", "--model.activation", "relu", "--print_config")
    assert first.returncode == 0, first.stderr
    saved = main.cwd / "printed.yaml"
    saved.write_text(first.stdout)
    assert yaml.safe_load(first.stdout)["model"]["activation"] == "relu"
    second = main("fit", "--config", str(saved), "--print_config")
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(second.stdout) == yaml.safe_load(first.stdout)


def test_validate_test_and_predict_from_a_checkpoint(main):
    assert main("fit", *FAST).returncode == 0
    ckpt = only_run_dir(main.cwd) / "checkpoints" / "last.ckpt"
    results = {sub: main(sub, "--ckpt_path", str(ckpt)) for sub in ("validate", "test", "predict")}
    for subcommand, result in results.items():
        assert result.returncode == 0, f"{subcommand}: {result.stderr}"
    assert "val/loss" in results["validate"].stdout
    assert "test/acc" in results["test"].stdout


def test_help_documents_the_options(main):
    result = main("fit", "--help")
    assert result.returncode == 0
    for option in ("--model.depth", "--model.activation", "--optimizer", "--checkpoint.save_last"):
        assert option in result.stdout
    data_help = main("fit", "--data.help", "Toy2DDataModule")
    assert "--data.variant" in data_help.stdout and "two_clusters" in data_help.stdout


def test_top_level_help_lists_the_subcommands_without_loading_lightning(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys, src.train; src.train.main(['--help']); print('lightning' in sys.modules)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: python -m src.train [fit|validate|test|predict]" in result.stdout
    assert "fit --help" in result.stdout and result.stdout.rstrip().endswith("False")
