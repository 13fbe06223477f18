"""The study runner: a grid over any option, checked before it runs, summarised per grid point and per run."""

from __future__ import annotations

import csv

import pytest
import yaml

from src.callbacks import PlateauDetector
from src.models import MLPClassifier
from src.study import check_options, grid, load_study, run_args, run_name, write_outputs
from tests.helpers import REPO, call_entry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TWO_AXES = (
    "grid:\n  model.init: [default, kaiming_normal]\n  model.batch_norm: [false, true]\n"
    "seeds: [0]\nstalled_above: null\nsolved_below: null\n"
)


@pytest.mark.slow
def test_study_runs_a_grid_and_finds_sigmoid_stalls_where_relu_learns(tmp_path, capsys, monkeypatch):
    from src.study import main

    study = tmp_path / "study.yaml"
    study.write_text(
        "base_config: configs/default.yaml\nactivations: [sigmoid, relu]\ndepths: [7]\nseeds: [0]\n"
        "config:\n  trainer:\n    callbacks: [{class_path: src.callbacks.PlateauDetector}]\n"
        "    enable_checkpointing: false\n"
        "args: [--trainer.max_epochs=300]\nstop_below: 0.05\n"
    )
    monkeypatch.chdir(tmp_path)
    result = call_entry(main, [str(study), "--out", str(tmp_path / "out"), "--workers", "2"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[2/2]" in result.stdout and "after 300 epochs" in result.stdout  # a line per run
    assert "study: 100%" in result.stderr and "2/2 [" in result.stderr  # and the overall bar
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = {row["activation"]: row for row in csv.DictReader(f)}
    assert rows["sigmoid"]["stalled"] == "True" and rows["sigmoid"]["diagnosis"] == "flat"
    assert rows["relu"]["stalled"] == "False" and float(rows["relu"]["final_loss"]) < 0.05
    # stop_below: the learned run stopped at its first epoch below 0.05; the stalled one ran on.
    assert int(rows["relu"]["epochs"]) == int(rows["relu"]["epoch_below_0.05"]) + 1 < 300
    assert int(rows["sigmoid"]["epochs"]) == 300
    assert "| sigmoid | 0.69" in (tmp_path / "out" / "summary.md").read_text()
    for name in ("sigmoid_d07_s0", "relu_d07_s0"):  # each an ordinary logged run
        assert list((tmp_path / "out" / "runs" / name).glob("lightning_logs/version_0/events.out.tfevents.*"))


def test_bad_study_file_is_one_line(tmp_path, capsys):
    from src.study import main

    study = tmp_path / "bad.yaml"
    study.write_text("activations: [sigmoid]\ndepths: [0]\nseeds: [0]\n")
    result = call_entry(main, [str(study)], capsys)
    assert result.returncode == 2 and "'depths' must be positive integers" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_stop_below_above_solved_below_is_one_line(tmp_path, capsys):
    from src.study import main

    study = tmp_path / "bad.yaml"
    study.write_text("activations: [relu]\ndepths: [2]\nseeds: [0]\nstop_below: 0.1\n")
    result = call_entry(main, [str(study)], capsys)
    assert result.returncode == 2 and "'stop_below' must be a loss in (0, solved_below = 0.05]" in result.stderr
    assert result.stderr.count("\n") == 1


def test_study_policy_axis_doubles_the_grid_and_shows_in_the_table(tmp_path):
    from src.study import grid, load_study, run_args, run_name, write_outputs

    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "activations: [relu]\ndepths: [2, 3]\nseeds: [0, 1]\n"
        "policies:\n  none: null\n  default: {trainer: {callbacks: [{class_path: src.callbacks.PlateauEscape}]}}\n"
    )
    study = load_study(study_file)
    points = grid(study)
    assert len(points) == 8 and len({run_name(p) for p in points}) == 8
    default = next(p for p in points if p["policy"] == "default")
    assert run_name(default).endswith("_default") and "PlateauEscape" in " ".join(run_args(study, default, "o"))
    assert "PlateauEscape" not in " ".join(run_args(study, next(p for p in points if p["policy"] == "none"), "o"))
    rows = [
        {**p, "run": run_name(p), "final_loss": 0.01 if p["policy"] == "default" else 0.69,
         "stalled": p["policy"] == "none", "diagnosis": "flat", "first_stall_epoch": 100,
         "epoch_below_0.05": 300 if p["policy"] == "default" else "", "seconds": 1.0, "log_dir": ""}
        for p in points
    ]  # fmt: skip
    write_outputs(rows, study, tmp_path, "python -m src.study study.yaml")
    table = (tmp_path / "summary.md").read_text()
    assert "The same in every run: activation relu." in table  # a column only for the axes that vary
    assert "| policy | depth | runs | median_final_loss | stalled | below_0.05 | diagnosis |" in table
    assert "| default | 2 | 2 | 0.0100 | 0/2 | 2/2 | flat | 300 |" in table
    assert "| none | 3 | 2 | 0.6900 | 2/2 | 0/2 | flat | - |" in table
    assert "| none | 3 | 1 | 0.6900 | True |" in table  # and every run, each seed on its own line


def test_a_grid_over_any_options_is_their_product_and_reaches_each_run(tmp_path):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(TWO_AXES + "metrics: [test/acc]\ntest: true\n")
    study = load_study(study_file)
    points = grid(study)
    assert points == [
        {"model.init": init, "model.batch_norm": norm, "seed": 0}
        for init in ("default", "kaiming_normal") for norm in (False, True)
    ]  # fmt: skip
    assert [run_name(p, study) for p in points] == [
        "init-default_batch_norm-False_s0", "init-default_batch_norm-True_s0",
        "init-kaiming_normal_batch_norm-False_s0", "init-kaiming_normal_batch_norm-True_s0",
    ]  # fmt: skip
    args = run_args(study, points[3], "out")
    assert "--model.init=kaiming_normal" in args and "--model.batch_norm=true" in args
    assert "--seed_everything=0" in args


def test_the_table_has_a_column_for_each_axis_that_varies_and_each_metric(tmp_path):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "grid:\n  model.init: [default, kaiming_normal]\n  model.dropout: [0.0, 0.3]\n  model.width: [10]\n"
        "seeds: [0, 1]\nmetrics: [test/acc]\ncount_below: {val/loss: 0.3}\n"
        "stalled_above: null\nsolved_below: null\n"
    )
    study = load_study(study_file)
    assert study.metrics == ("test/acc", "val/loss")  # a counted metric is reported as well
    rows = [
        {**p, "run": run_name(p, study), "final_loss": 0.1, "test/acc": 0.8 + 0.1 * p["seed"],
         "val/loss": 0.2 if p["model.dropout"] else 0.4, "epochs": 5, "seconds": 1.0, "log_dir": ""}
        for p in grid(study)
    ]  # fmt: skip
    write_outputs(rows, study, tmp_path, "python -m src.study study.yaml")
    with open(tmp_path / "summary.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 8 and list(written[0])[:4] == ["model.init", "model.dropout", "model.width", "seed"]
    table = (tmp_path / "summary.md").read_text()
    assert "The same in every run: model.width 10." in table
    header = (
        "| model.init | model.dropout | runs | median_final_loss | median test/acc | median val/loss | val/loss < 0.3 |"
    )
    assert header in table
    assert "| kaiming_normal | 0.3 | 2 | 0.1000 | 0.8500 | 0.2000 | 2/2 |" in table
    assert "| default | 0.0 | 2 | 0.1000 | 0.8500 | 0.4000 | 0/2 |" in table
    assert "stalled" not in table and "epoch_below" not in table  # left out: stalled_above/solved_below null
    assert not (tmp_path / "final_loss_vs_depth.png").exists()  # depth does not vary


def test_an_unknown_option_fails_in_one_line_before_any_run(tmp_path, capsys):
    from src.study import main

    study_file = tmp_path / "study.yaml"
    study_file.write_text("grid:\n  model.init: [default, xavier_normal]\n  model.widht: [4, 8]\nseeds: [0]\n")
    result = call_entry(main, [str(study_file), "--out", str(tmp_path / "out")], capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "grid option 'model.widht'" in result.stderr and "--model.widht=4" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("grid: {model.init: [default, he]}\n", "grid option 'model.init' value 'he'"),
        ("grid: {model.dropout: [0.0, 1.5]}\n", "grid option 'model.dropout' value 1.5"),
        ("variants:\n  softmax: {model.depth: 1}\n  mlp: {model.depht: 3}\n", "variant 'mlp'"),
        ("policies:\n  none: null\n  bad: {trainer: {max_epoch: 3}}\n", "policy 'bad'"),
        ("seeds: [0]\nconfig: {model: {widht: 3}}\n", "base_config, config or args"),
    ],
)
def test_a_bad_value_is_named_by_its_axis(tmp_path, body, named):
    from src.study import StudyError

    study_file = tmp_path / "study.yaml"
    study_file.write_text(body)
    with pytest.raises(StudyError) as raised:
        check_options(load_study(study_file))
    assert str(raised.value).startswith(f"{study_file}: {named}: "), raised.value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("grid: {model.init: [[1, 2]]}\n", "takes plain values"),
        ("grid: {model.depth: [2, 3]}\ndepths: [4]\n", "'model.depth' is set by both 'depths' and 'grid'"),
        ("grid: {model.init: []}\n", "grid option 'model.init' must have a non-empty list"),
        ("grid: {'model init': [1]}\n", "is not an option name"),
        ("variants: {softmax: 1}\n", "variant 'softmax' must map options to values"),
        ("test: true\n", "no axis"),
        ("seeds: [0]\nmetrics: test/acc\n", "'metrics' must be a list"),
        ("seeds: [0]\ncount_below: {val/loss: low}\n", "'count_below' must map a metric name to a number"),
    ],
)
def test_a_malformed_study_file_is_one_line(tmp_path, capsys, body, message):
    from src.study import main

    study_file = tmp_path / "study.yaml"
    study_file.write_text(body)
    result = call_entry(main, [str(study_file)], capsys)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_tiny_grid_over_two_non_default_axes_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from src.study import main

    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        TWO_AXES + "base_config: configs/default.yaml\nmetrics: [test/acc]\ntest: true\n"
        "config: {trainer: {callbacks: [], enable_checkpointing: false}}\n"
        "args: [--trainer.max_epochs=3, --model.depth=3]\n"
    )
    monkeypatch.chdir(tmp_path)
    result = call_entry(main, [str(study_file), "--out", str(tmp_path / "out"), "--workers", "2"], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model.init"], r["model.batch_norm"]) for r in rows] == [
        ("default", "False"), ("default", "True"), ("kaiming_normal", "False"), ("kaiming_normal", "True")
    ]  # fmt: skip
    assert all(0.0 <= float(r["test/acc"]) <= 1.0 and r["epochs"] == "3" for r in rows)
    assert "stalled" not in rows[0] and "diagnosis" not in rows[0]  # no detector, no stall columns
    header = "| model.init | model.batch_norm | final_loss | test/acc |"
    assert header in (tmp_path / "out" / "summary.md").read_text()
    for row in rows:  # each run is an ordinary logged run that got its grid point's options
        run = tmp_path / "out" / "runs" / row["run"] / "lightning_logs" / "version_0"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["init"] == row["model.init"]
        assert str(config["model"]["batch_norm"]) == row["model.batch_norm"]
        assert list(run.glob("events.out.tfevents.*"))


def test_rows_follow_the_study_files_order_and_a_single_seed_is_not_a_median(tmp_path):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "variants:\n  softmax: {model.depth: 1}\n  mlp: {model.depth: 3}\n  he: {model.init: kaiming_normal}\n"
        "seeds: [0]\nmetrics: [test/acc]\nstalled_above: null\nsolved_below: null\n"
    )
    study = load_study(study_file)
    rows = [
        {**p, "run": run_name(p, study), "final_loss": 0.5, "test/acc": acc, "epochs": 15, "seconds": 1, "log_dir": ""}
        for p, acc in zip(reversed(grid(study)), (0.89, 0.88, 0.84), strict=True)
    ]  # fmt: skip
    write_outputs(rows, study, tmp_path, "python -m src.study study.yaml")
    table = (tmp_path / "summary.md").read_text()
    assert "| variant | final_loss | test/acc |" in table and "median" not in table
    assert table.index("| softmax |") < table.index("| mlp |") < table.index("| he |")
    assert "Every run:" not in table  # one run per row: the table is every run already


def test_base_config_can_be_swapped_on_the_command_line(tmp_path, capsys):
    from src.study import main

    study = load_study(REPO / "configs" / "study" / "mnist_labs.yaml", str(REPO / "configs" / "mnist.yaml"))
    point = grid(study)[0]
    assert run_args(study, point, "out")[:2] == ["--config", str(REPO / "configs" / "mnist.yaml")]
    check_options(study)  # every variant parses on MNIST's config too
    result = call_entry(
        main, [str(REPO / "configs" / "study" / "mnist_labs.yaml"), "--base-config", "nope.yaml"], capsys
    )
    assert result.returncode == 2 and "base_config nope.yaml does not exist" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_policy_adds_its_callbacks_to_the_ones_config_names_once(main):
    study = load_study(REPO / "configs" / "study" / "vanishing.yaml")
    names = {}
    for policy in ("none", "default"):
        point = {**grid(study)[0], "policy": policy}
        result = main("fit", *run_args(study, point, "out"), "--print_config")
        assert result.returncode == 0, result.stderr[-2000:]
        printed = yaml.safe_load(result.stdout)["trainer"]["callbacks"]
        names[policy] = [c["class_path"].rsplit(".", 1)[-1] for c in printed]
        assert printed[1]["init_args"]["patience"] == 100 and printed[1]["init_args"]["good_enough"] == 0.01
    assert names == {"none": ["GradNormMonitor", "PlateauDetector"],
                     "default": ["GradNormMonitor", "PlateauDetector", "PlateauEscape"]}  # fmt: skip


def test_a_runs_warnings_go_to_its_own_log_not_the_studys_console(tmp_path, capfd):
    import logging
    import warnings

    from src.study import run_point
    from src.study.runner import RUN_LOG, run_log

    lightning_log = logging.getLogger("lightning.pytorch")
    before = (lightning_log.handlers[:], lightning_log.propagate)
    with run_log(tmp_path / "a" / RUN_LOG):
        warnings.warn("a user warning of this run", UserWarning, stacklevel=1)
        lightning_log.info("a message of Lightning's")
    assert (lightning_log.handlers, lightning_log.propagate) == before
    text = (tmp_path / "a" / RUN_LOG).read_text()
    assert "a user warning of this run" in text and "a message of Lightning's" in text
    assert "a user warning" not in capfd.readouterr().err
    study_file = tmp_path / "study.yaml"
    study_file.write_text("activations: [relu]\ndepths: [2]\nseeds: [0]\nargs: [--trainer.max_epochs=2]\n")
    study = load_study(study_file)
    row = run_point(study, grid(study)[0], str(tmp_path / "out"))
    log = (tmp_path / "out" / "runs" / row["run"] / RUN_LOG).read_text()
    assert "`Trainer.fit` stopped: `max_epochs=2` reached" in log
    assert "Trainer.fit" not in capfd.readouterr().err


class NaNOnceOutOfTheStall(MLPClassifier):
    """The loss is 1.0 to epoch 3 (a stall at patience 3), then falls, and is NaN in epoch 6."""

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        epoch = self.current_epoch
        value = float("nan") if epoch == 6 else 1.0 if epoch < 4 else 0.35 - 0.01 * epoch
        return logits, loss - loss.detach() + value


def test_a_divergence_the_escape_rolls_back_does_not_end_a_study_run(tmp_path):
    """The study's stop at convergence (``stop_below``) leaves a NaN to the detector: rolled back, the run goes on."""
    from src.study import prepare_run

    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "base_config: configs/default.yaml\nseeds: [0]\nstop_below: 0.01\n"
        "config:\n  trainer:\n    enable_checkpointing: false\n    callbacks:\n"
        "      - {class_path: src.callbacks.PlateauDetector, init_args: {patience: 3, divergence_threshold: 10.0}}\n"
        "      - {class_path: src.callbacks.PlateauEscape, init_args: {actions: [{momentum: 0.9}]}}\n"
        "args: [--trainer.max_epochs=10, --trainer.limit_val_batches=0]\n"
    )
    study = load_study(study_file)
    cli, _ = prepare_run(study, grid(study)[0], str(tmp_path / "out"))
    cli.trainer.fit(NaNOnceOutOfTheStall(depth=3, width=4), datamodule=cli.datamodule)
    detector = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PlateauDetector))
    assert [(e.kind.value, e.epoch) for e in detector.events] == [("stall", 3), ("divergence", 6)]
    assert detector.events[1].actions[0].action.startswith("diverged: rolled back to epoch 4")
    assert cli.trainer.current_epoch == 10 and float(cli.trainer.callback_metrics["train/loss"]) == pytest.approx(0.26)
