"""The command line end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

FAST = ("--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "1", "--checkpoint.every_n_epochs", "1")


def only_run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "lightning_logs").glob("version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_train_fit_writes_events_config_and_checkpoints(cli):
    result = cli("fit", *FAST)
    assert result.returncode == 0, result.stderr
    run = only_run_dir(cli.cwd)
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["depth"] == 7 and config["model"]["activation"] == "sigmoid"
    assert config["trainer"]["max_epochs"] == 3
    # the end-of-run summary
    assert "train loss" in result.stdout and "val   loss" in result.stdout
    assert str(run) in result.stdout
    assert "tensorboard --logdir" in result.stdout


def test_train_without_subcommand_runs_fit_with_the_default_config(cli):
    result = cli(*FAST)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((only_run_dir(cli.cwd) / "config.yaml").read_text())
    assert config["data"]["class_path"] == "src.data.Toy2DDataModule"
    assert "Finished after 3 epochs" in result.stdout


def test_print_config_round_trips(cli):
    first = cli("fit", "--model.activation", "relu", "--print_config")
    assert first.returncode == 0, first.stderr
    saved = cli.cwd / "printed.yaml"
    saved.write_text(first.stdout)
    assert yaml.safe_load(first.stdout)["model"]["activation"] == "relu"
    second = cli("fit", "--config", str(saved), "--print_config")
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(second.stdout) == yaml.safe_load(first.stdout)


def test_validate_test_and_predict_from_a_checkpoint(cli):
    assert cli("fit", *FAST).returncode == 0
    ckpt = only_run_dir(cli.cwd) / "checkpoints" / "last.ckpt"
    results = {sub: cli(sub, "--ckpt_path", str(ckpt)) for sub in ("validate", "test", "predict")}
    for subcommand, result in results.items():
        assert result.returncode == 0, f"{subcommand}: {result.stderr}"
    assert "val/loss" in results["validate"].stdout
    assert "test/acc" in results["test"].stdout


def test_help_documents_the_options(cli):
    result = cli("fit", "--help")
    assert result.returncode == 0
    for option in ("--model.depth", "--model.activation", "--optimizer", "--checkpoint.save_last"):
        assert option in result.stdout
    data_help = cli("fit", "--data.help", "Toy2DDataModule")
    assert "--data.variant" in data_help.stdout and "two_clusters" in data_help.stdout


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("--model.depth", "0"), "model.depth"),
        (("--model.width", "0"), "model.width"),
        (("--model.activation", "swish"), "model.activation"),
        (("--optimizer.lr", "-0.1"), "optimizer"),
        (("--data.variant", "spiral"), "variant"),
        (("--model.dropout", "1.5"), "model.dropout"),
        (("--trainer.max_epochs", "many"), "trainer.max_epochs"),
        (("--config", "no_such_file.yaml"), "no_such_file.yaml"),
    ],
)
def test_bad_input_exits_with_one_line_naming_the_option(cli, args, names):
    result = cli("fit", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert names in errors[0], errors[0]
    assert not (cli.cwd / "lightning_logs").exists()


def test_top_level_help_lists_the_subcommands_without_loading_lightning(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys, src.train; src.train.main(['--help']); print('lightning' in sys.modules)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: python -m src.train [fit|validate|test|predict]" in result.stdout
    assert "fit --help" in result.stdout and result.stdout.rstrip().endswith("False")
