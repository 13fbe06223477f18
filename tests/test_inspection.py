"""Inspecting runs: TensorBoard (through a real server and in a browser), the report, the figures and the notebook."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import nbformat
import pytest
import torch
from nbclient import NotebookClient
from torch.utils.tensorboard import SummaryWriter

from src.callbacks.events import EventKind, StallEvent
from src.report import load_run
from tests.helpers import REPO, call_entry, quiet_trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A fresh default run long enough to stall, escape and learn (700 epochs, in this process): tests
    that read it are ``slow``."""
    from src.cli import main

    cwd = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["python -m src.train"])
        patch.delenv("TEMPLATE_DEBUG", raising=False)
        main(["fit", "--trainer.max_epochs", "700"])
    return cwd / "lightning_logs" / "version_0"


@pytest.fixture
def report(capsys):
    """``python -m src.report ARGS`` in this process."""
    from src.report import main

    return lambda *args: call_entry(main, args, capsys)


@pytest.mark.slow
def test_report_prints_the_run_and_writes_its_plots(run_dir, tmp_path, report):
    result = report(str(run_dir), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "depth 7, width 10, activation sigmoid" in out and "SGD(lr=0.1" in out
    assert "stall (flat)" in out and "momentum 0.9" in out and "train/loss" in out
    run = load_run(run_dir)
    assert f"{run.last('train/loss'):.4g}" in out
    assert list(run.per_layer("saturated/")) == [f"layers.{i}" for i in range(6)]  # the output layer has none
    pictures = ("loss.png", "gradient_flow.png", "grad_heatmap.png", "layer_activity.png", "update_ratio.png")
    for name in (*pictures, "decision_regions.png"):  # 2-D data
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


@pytest.mark.slow
def test_report_reads_the_layers_in_order_and_the_events(run_dir):
    run = load_run(run_dir.parent)  # the folder of runs: its newest run
    assert run.path == run_dir
    assert run.layer_names() == [f"layers.{i}" for i in range(7)]
    layers, steps, rows = run.grad_matrix()
    assert len(rows) == 7 and len(rows[0]) == len(steps) > 10
    # the source's picture of the stall: at the start the first layer's gradient is far below the last's
    assert rows[0][0] / rows[-1][0] < 1e-2
    assert run.events[0].kind == "stall" and run.events[0].diagnosis == "flat"


@pytest.mark.slow
def test_report_draws_the_fitted_dnnex_curve_of_the_runs_final_model(main, report, tmp_path):
    from src.report import load_fitted, plot_fitted_curve

    result = main("fit", "--config", str(REPO / "configs" / "dnnex.yaml"), "--trainer.max_epochs=200",
                  "--data.init_args.n_samples=400", "--trainer.enable_progress_bar=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = main.cwd / "lightning_logs" / "version_0"
    written = report(str(run_dir), "--out", str(tmp_path))
    assert written.returncode == 0 and f"wrote {tmp_path / 'fitted_curve.png'}" in written.stdout, written.stdout
    assert (tmp_path / "fitted_curve.png").read_bytes().startswith(PNG_MAGIC)
    run = load_run(run_dir)
    fitted = load_fitted(run)
    assert fitted.checkpoint.name == "last.ckpt" and fitted.x.shape == (400, 1) and fitted.prob_true.shape == (400,)
    # the curve is the run's final model: its error against the true curve is the last val/prob_mae logged
    mae = (fitted.model.predict_proba(fitted.x_true) - fitted.prob_true).abs().mean()
    assert float(mae) == pytest.approx(run.last("val/prob_mae"), abs=1e-6)
    labels = [t.get_text() for t in plot_fitted_curve(fitted, run).axes[0].get_legend().get_texts()]
    assert labels == ["data (y = 0 / 1)", "true P(y=1)", "fitted P(y=1)"]
    # the data file the config names has moved: the picture is left out, in one line
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("csv_path: null", "csv_path: moved/dnnex.csv"))
    (tmp_path / "moved").mkdir()
    moved = report(str(run_dir), "--out", str(tmp_path / "moved"))
    assert moved.returncode == 0 and "Traceback" not in moved.stderr, moved.stderr
    assert "no picture of what the model learned: the data of" in moved.stdout and "moved/dnnex.csv" in moved.stdout


@pytest.mark.slow
def test_report_draws_the_decision_regions_of_2d_data(main, report, tmp_path):
    from src.report import load_fitted, plot_decision_regions

    result = main("fit", "--config", str(REPO / "configs" / "blobs.yaml"), "--trainer.max_epochs=30",
                  "--trainer.enable_progress_bar=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = main.cwd / "lightning_logs" / "version_0"
    written = report(str(run_dir), "--out", str(tmp_path))
    assert f"wrote {tmp_path / 'decision_regions.png'}" in written.stdout, written.stdout
    fitted = load_fitted(load_run(run_dir))
    assert fitted.x.shape == (400, 2) and sorted(set(fitted.y.tolist())) == [0, 1, 2, 3]
    ax = plot_decision_regions(fitted, load_run(run_dir)).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"class {i}" for i in range(4)]
    # the title's accuracy is the model's on the points drawn
    accuracy = float((fitted.model.predict_proba(fitted.x).argmax(1) == fitted.y).float().mean())
    assert f"train accuracy {accuracy:.3f}" in ax.get_title()


def test_report_without_a_checkpoint_says_why_there_is_no_fit_picture(main, report, tmp_path):
    result = main("fit", "--trainer.max_epochs=2", "--trainer.enable_checkpointing=false",
                  "--trainer.enable_progress_bar=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    written = report(str(main.cwd / "lightning_logs" / "version_0"), "--out", str(tmp_path))
    assert written.returncode == 0 and "no picture of what the model learned: no checkpoint in" in written.stdout
    assert not (tmp_path / "decision_regions.png").exists() and (tmp_path / "loss.png").exists()


def test_report_on_a_bad_run_dir_is_one_line(tmp_path, report):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_scalars = tmp_path / "no_scalars"
    SummaryWriter(str(no_scalars)).close()
    for path, expected in ((tmp_path / "missing", "no such folder"), (empty, "not a run directory"),
                           (no_scalars, "no scalars logged yet")):  # fmt: skip
        result = report(str(path))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, data: dict | None = None):
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_scalars_layout_and_hparams_of_a_run(run_dir):
    tensorboard = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or shutil.which("tensorboard")
    port = free_port()
    server = subprocess.Popen(
        [tensorboard, "--logdir", str(run_dir.parent), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline, tags = time.monotonic() + 90, {}
        while "version_0" not in tags:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "TensorBoard did not list the run"
            with contextlib.suppress(OSError):  # not listening yet
                tags = get_json(f"{base}/scalars/tags")
            time.sleep(0.5)
        run_tags = set(tags["version_0"])
        assert {f"grad_norm/layers.{i}" for i in range(7)} <= run_tags
        assert {"train/loss", "val/loss", "optim/lr", "optim/momentum", "plateau/stall"} <= run_tags
        query = urllib.parse.urlencode({"run": "version_0", "tag": "train/loss"})
        served = get_json(f"{base}/scalars/scalars?{query}")
        steps, values = load_run(run_dir).scalars["train/loss"]
        assert [p[1] for p in served] == steps and [p[2] for p in served] == pytest.approx(values)
        query = urllib.parse.urlencode({"run": "version_0", "tag": "optim/momentum"})
        assert max(p[2] for p in get_json(f"{base}/scalars/scalars?{query}")) == pytest.approx(0.9)  # the first action
        layout = get_json(f"{base}/custom_scalars/layout")
        charts = {c["title"] for category in layout["category"] for c in category["chart"]}
        assert {"gradient norm of every layer (log10)", "loss, with stall / divergence markers"} <= charts
        assert "lr and momentum" in charts and "saturated share per layer (bounded activations)" in charts
        experiment = get_json(f"{base}/hparams/experiment", {"experimentName": ""})
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"depth", "width", "activation", "optimizer", "lr"} <= hparams
        assert {"final/train/loss", "final/stalls"} <= metrics
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_tensorboard_in_a_browser_shows_the_stall_charts_and_the_hparams_table(run_dir, tmp_path):
    from src.figures import browser_missing, look_at_tensorboard

    if (why := browser_missing()) is not None:
        pytest.skip(why)
    seen = look_at_tensorboard(run_dir.parent, tmp_path)
    assert seen["layer_lines"] == 7  # "gradient norm of every layer (log10)": one line per layer
    assert {"train/loss (version_0)", "val/loss (version_0)", "plateau/stall (version_0)"} <= {
        series.lstrip("◼▲◆●▼★✚ ").strip() for series in seen["loss_series"]
    }  # the loss chart with its stall markers
    assert seen["saturated_lines"] == 6  # every sigmoid layer; the output layer has no activation
    ratio = {series.lstrip("◼▲◆●▼★✚ ").strip() for series in seen["update_ratio_series"]}
    assert {"update_ratio_log10/layers.0 (version_0)", "update_ratio_log10/reference (version_0)"} <= ratio
    assert len(ratio) == 8  # seven layers and the reference line
    assert seen["hparams_runs"] == ["version_0"] and seen["hparams_final_metrics"]
    for name in ("tensorboard_custom_scalars.png", "tensorboard_layers.png", "tensorboard_hparams.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_the_figures_command_redraws_the_readme_pictures(tmp_path, capsys, monkeypatch):
    from src.figures import browser_missing, main

    study = tmp_path / "study"
    study.mkdir()
    (study / "summary.csv").write_text(
        "policy,optimizer,activation,depth,seed,run,final_loss,stalled,diagnosis,first_stall_epoch,epoch_below_0.05\n"
        "none,config,sigmoid,7,0,r1,0.6931,True,flat,120,\n"
        "default,config,sigmoid,7,0,r2,0.001,False,flat,120,600\n"
        "none,config,sigmoid,8,0,r3,0.6931,True,flat,110,\n"
        "default,config,sigmoid,8,0,r4,0.002,False,flat,110,650\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "figures"
    args = ["--out", str(out), "--epochs", "250", "--dnnex-epochs", "300", "--study", str(study)]
    result = call_entry(main, args, capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    names = ["gradient_flow.png", "loss.png", "dnnex_fitted_curve.png", "blobs_decision_regions.png"]
    names += ["layer_activity.png", "final_loss_vs_depth.png"]
    tensorboard = ["tensorboard_custom_scalars.png", "tensorboard_layers.png", "tensorboard_hparams.png"]
    names += tensorboard if browser_missing() is None else []
    for name in names:
        assert f"wrote {out / name}" in result.stdout
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


def test_gradient_flow_draws_each_stall_as_its_diagnosis_saw_it(tmp_path):
    from src.report import Run, plot_gradient_flow, stall_profiles

    layers = ["layers.0", "layers.1", "layers.2"]
    scalars = {f"grad_norm/{name}": ([0, 10, 500], [1e-3 * (i + 1), 1e-9, 1e-2]) for i, name in enumerate(layers)}
    vanishing, flat = [1e-12, 1e-8, 1e-4], [1e-5, 2e-5, 1e-5]
    stall = functools.partial(StallEvent, EventKind.STALL, monitor="train/loss", value=0.69)
    events = [
        stall(epoch=120, step=120, diagnosis="vanishing", grad_norms=dict(zip(layers, vanishing, strict=True))),
        StallEvent(EventKind.DIVERGENCE, 300, 300, "train/loss", float("nan")),
        stall(epoch=400, step=400, diagnosis="flat", grad_norms=dict(zip(layers, flat, strict=True))),
    ]
    run = Run(tmp_path, scalars, events=events)
    assert stall_profiles(run) == [
        ("stall at epoch 120: vanishing", [1e-12, 1e-8, 1e-4]),
        ("stall at epoch 400: flat", [1e-5, 2e-5, 1e-5]),
    ]
    legend = [t.get_text() for t in plot_gradient_flow(run).axes[0].get_legend().get_texts()]
    assert legend == ["step 0 (start)", "stall at epoch 120: vanishing", "stall at epoch 400: flat", "step 500 (end)"]


@pytest.mark.slow
@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_committed_clean_and_runs_on_a_fresh_run(notebook, run_dir, monkeypatch):
    nb = nbformat.read(notebook, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    monkeypatch.setenv("RUN_DIR", str(run_dir))
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    ).execute()
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3


@pytest.mark.parametrize("option", ["--epochs", "--dnnex-epochs"])
def test_the_figures_command_rejects_a_bad_epoch_count_before_any_run(option, tmp_path, capsys):
    from src.figures import main

    result = call_entry(main, [option, "0", "--out", str(tmp_path / "figures")], capsys)
    assert result.returncode == 2 and result.stderr == f"error: {option} must be >= 1 (epochs of that run), got 0\n"
    assert not (tmp_path / "figures").exists()


class LogitsNet(L.LightningModule):
    """A LightningModule that is not the template's: no ``predict_proba``, two logits."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_the_fit_picture_rebuilds_the_module_the_runs_config_names(tmp_path):
    from src.data import Toy2DDataModule
    from src.report import Run, load_fitted, plot_decision_regions

    L.seed_everything(0, verbose=False)
    model = LogitsNet(hidden=6)
    trainer = quiet_trainer(max_epochs=30, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=Toy2DDataModule(n_samples=40))
    (tmp_path / "checkpoints").mkdir()
    trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    config = {"model": {"class_path": f"{__name__}.LogitsNet", "init_args": {"hidden": 6}},
              "data": {"class_path": "src.data.Toy2DDataModule", "init_args": {"n_samples": 40}}}  # fmt: skip
    run = Run(tmp_path, {}, config)
    fitted = load_fitted(run)
    assert type(fitted.model).__name__ == "LogitsNet" and fitted.model.hparams.hidden == 6
    expected = float((model(fitted.x).argmax(1) == fitted.y).float().mean())
    assert f"train accuracy {expected:.3f}" in plot_decision_regions(fitted, run).axes[0].get_title()


def test_the_layer_pictures_draw_each_layer_in_order_with_the_reference(tmp_path):
    from src.report import Run, plot_layer_activity, plot_update_ratio

    layers = ["layers.0", "layers.1", "layers.10", "layers.2"]
    scalars = {f"saturated/{name}": ([0, 10], [0.1 * i, 0.2]) for i, name in enumerate(layers)}
    scalars |= {f"update_ratio_log10/{name}": ([0, 10], [-2.0, -3.5]) for name in layers}
    scalars["update_ratio_log10/reference"] = ([0, 10], [-3.0, -3.0])
    run = Run(tmp_path, scalars)
    legend = [t.get_text() for t in plot_layer_activity(run).axes[0].get_legend().get_texts()]
    assert legend == ["layers.0", "layers.1", "layers.2", "layers.10"]
    ratio = plot_update_ratio(run).axes[0]
    assert [t.get_text() for t in ratio.get_legend().get_texts()][-1] == "-3 (reference)"
    assert [line.get_ydata()[1] for line in ratio.get_lines()[:4]] == [-3.5] * 4
    dead = Run(tmp_path, {"dead/layers.0": ([0], [0.5])})
    assert plot_layer_activity(dead).axes[0].get_ylabel() == "dead share"
