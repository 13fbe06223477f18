"""Read a finished (or running) run back from its files, print what happened, and draw it.

    python -m src.report lightning_logs/version_0        # table + PNGs in the run directory
    python -m src.report lightning_logs                   # the newest run under it
    python -m src.report RUN_DIR --no-plots

Reads the TensorBoard event files, ``config.yaml`` and ``stall_events.json``; nothing is re-trained.
Writes ``loss.png`` (train/val loss with stall and escape markers), ``gradient_flow.png``
(gradient norm against layer index, log scale, at the start, at each stall with its diagnosis and
at the end: the source study's picture) and ``grad_heatmap.png`` (layer x step). For 1-D and 2-D
data it also draws what the model learned, from the run's last checkpoint and the data its config
names: ``fitted_curve.png`` (1-D: the predicted P(y=1) over the true curve and the data, the dnnex
picture) or ``decision_regions.png`` (2-D: the class regions with the points). The notebooks use
the same functions.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.callbacks.events import EventKind, StallEvent, load_events
from src.callbacks.plateau_rule import describe_units
from src.errors import one_line, one_line_errors
from src.names import (
    EVENTS_FILE,
    GRAD_NORM,
    GRAD_NORM_FIRST_TO_LAST,
    GRAD_NORM_TOTAL,
    METRICS,
    TRAIN_LOSS,
    VAL_LOSS,
)

LAYER_TAG = re.compile(rf"^{re.escape(GRAD_NORM)}(.+)$")
NOT_LAYERS = {GRAD_NORM_TOTAL.removeprefix(GRAD_NORM), GRAD_NORM_FIRST_TO_LAST.removeprefix(GRAD_NORM)}


class RunError(ValueError):
    """RUN_DIR cannot be read as a run; the message says why and what to give instead."""


@dataclass
class Run:
    """What a run left on disk: scalars by tag as (steps, values), the config and the stall events."""

    path: Path
    scalars: dict[str, tuple[list[int], list[float]]]
    config: dict[str, Any] = field(default_factory=dict)
    events: list[StallEvent] = field(default_factory=list)

    def last(self, tag: str) -> float | None:
        return self.scalars[tag][1][-1] if tag in self.scalars and self.scalars[tag][1] else None

    def layer_names(self) -> list[str]:
        """Per-layer gradient-norm tags in layer order (``layers.0, layers.1, ...``; parameters excluded)."""
        names = [m.group(1) for tag in self.scalars if (m := LAYER_TAG.match(tag))]
        layers = [n for n in names if n not in NOT_LAYERS and not n.endswith((".weight", ".bias"))]
        return sorted(layers, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])

    def grad_matrix(self) -> tuple[list[str], list[int], list[list[float]]]:
        """Layers, the steps at which every layer was logged, and norms[layer][step]."""
        layers = self.layer_names()
        if not layers:
            return [], [], []
        common = set(self.scalars[f"{GRAD_NORM}{layers[0]}"][0])
        for name in layers[1:]:
            common &= set(self.scalars[f"{GRAD_NORM}{name}"][0])
        steps = sorted(common)
        rows = []
        for name in layers:
            by_step = dict(zip(*self.scalars[f"{GRAD_NORM}{name}"], strict=True))
            rows.append([by_step[s] for s in steps])
        return layers, steps, rows


def find_run(path: str | Path) -> Path:
    """``path`` itself when it holds event files, else the newest ``version_*`` below it that does."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such folder; give a run directory such as lightning_logs/version_0")
    if not path.is_dir():
        raise RunError(f"{path}: not a folder; give a run directory such as lightning_logs/version_0")
    if list(path.glob("events.out.tfevents.*")):
        return path
    runs = [*path.glob("version_*/events.out.tfevents.*"), *path.glob("lightning_logs/version_*/events.out.tfevents.*")]
    if not runs:
        raise RunError(
            f"{path}: not a run directory (no events.out.tfevents.* in it, nor in version_*/ below it); "
            "give lightning_logs/version_N of a run that has started"
        )
    return max((p.parent for p in runs), key=lambda d: max(f.stat().st_mtime for f in d.glob("events.out.*")))


def load_run(path: str | Path) -> Run:
    """Read a run directory (or the newest run below ``path``) without TensorFlow or re-training."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = find_run(path)
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    try:
        accumulator.Reload()
    except Exception as err:  # a torn or foreign file
        raise RunError(f"{run_dir}: the event files cannot be read ({err})") from None
    scalars: dict[str, tuple[list[int], list[float]]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        points = sorted((e.step, e.value) for e in accumulator.Scalars(tag))
        # a resumed run may log a step twice: keep the newest value of each step
        by_step = dict(points)
        scalars[tag] = (list(by_step), list(by_step.values()))
    if not scalars:
        raise RunError(f"{run_dir}: no scalars logged yet; wait for the first logged step, or check the run's output")
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    events: list[StallEvent] = []
    if (run_dir / EVENTS_FILE).is_file():
        try:
            events = load_events(run_dir / EVENTS_FILE)
        except ValueError as err:
            raise RunError(str(err)) from None
    return Run(run_dir, scalars, config, events)


def _class_name(section: Any) -> str:
    if isinstance(section, dict) and "class_path" in section:
        args = section.get("init_args") or {}
        # the values a user sets; the optimizers' many defaults (False, 0.0) would drown them
        inner = ", ".join(f"{k}={v}" for k, v in args.items() if v not in (None, False, 0.0) or k == "momentum")
        return f"{section['class_path'].rsplit('.', 1)[-1]}({inner})"
    return str(section)


def summary(run: Run) -> str:
    """The run as a table: config essentials, final metrics, stall events with diagnosis and actions."""
    model = run.config.get("model") or {}
    rows = [("run", str(run.path))]
    if model:
        keys = ("depth", "width", "activation", "init", "dropout", "batch_norm")
        rows.append(("model", ", ".join(f"{k} {model[k]}" for k in keys if k in model)))
    for key in ("optimizer", "data"):
        if key in run.config:
            rows.append((key, _class_name(run.config[key])))
    for tag in METRICS:
        value = run.last(tag)
        if value is not None:
            steps = run.scalars[tag][0]
            rows.append((tag, f"{value:.4g} (step {steps[-1]})"))
    ratio = run.scalars.get(GRAD_NORM_FIRST_TO_LAST)
    if ratio:
        rows.append(
            ("first/last grad", f"{ratio[1][0]:.2g} at step {ratio[0][0]} -> {ratio[1][-1]:.2g} at {ratio[0][-1]}")
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append(f"{'events':<{width}}  {len(run.events) or 'none'}")
    for event in run.events:
        what = event.kind.value + (f" ({event.diagnosis})" if event.diagnosis else "")
        value = f"{event.value:.4g}" if math.isfinite(event.value) else str(event.value)
        actions = "; ".join(a.action for a in event.actions) or "-"
        units = f"  [{describe_units(event.units)}]" if event.units else ""
        lines.append(
            f"  epoch {event.epoch:>5}  step {event.step:>6}  {what:<18} {event.monitor} {value}  {actions}" + units
        )
    return "\n".join(lines)


def _figure():
    import matplotlib

    if not _in_notebook():
        matplotlib.use("Agg")  # files only; a notebook keeps its inline backend
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def plot_loss(run: Run):
    """train/val loss against step, log scale, with a line at each stall/divergence and its actions."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for tag in (TRAIN_LOSS, VAL_LOSS):
        if tag in run.scalars:
            steps, values = run.scalars[tag]
            ax.plot(steps, [max(v, 1e-12) for v in values], label=tag)
    for event in run.events:
        color = "tab:red" if event.kind is EventKind.DIVERGENCE else "tab:gray"
        ax.axvline(event.step, color=color, linestyle="--", linewidth=0.8)
        at_event = [a for a in event.actions if a.step in (None, event.step)]
        text = " / ".join([event.diagnosis or event.kind.value, *(a.action for a in at_event)])
        ax.annotate(text, (event.step, 0.02), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="bottom", ha="right", color=color)  # fmt: skip
        for action in event.actions:
            if action.step not in (None, event.step):  # e.g. an lr raise undone later
                ax.axvline(action.step, color="tab:green", linestyle=":", linewidth=0.8)
                ax.annotate(action.action.split(" (")[0], (action.step, 0.02), xycoords=("data", "axes fraction"),
                            fontsize=7, rotation=90, va="bottom", ha="right", color="tab:green")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"loss: {run.path.name}")
    ax.legend()
    fig.tight_layout()
    return fig


def stall_profiles(run: Run) -> list[tuple[str, list[float]]]:
    """The per-layer gradient norms each stall's diagnosis saw (from ``stall_events.json``), labelled
    with the epoch and the diagnosis, in layer order; events without them are left out."""
    layers = run.layer_names()
    profiles = []
    for event in run.events:
        norms = event.grad_norms or {}
        if event.kind is not EventKind.STALL or not layers or not all(name in norms for name in layers):
            continue
        profiles.append((f"stall at epoch {event.epoch}: {event.diagnosis or '?'}", [norms[n] for n in layers]))
    return profiles


def plot_gradient_flow(run: Run, ax=None):
    """Gradient norm against layer (log scale) at the first logged step, at each stall (the profile its
    diagnosis saw, named in the legend) and at the last logged step."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax)
    layers, steps, rows = run.grad_matrix()
    if not layers:
        ax.text(0.5, 0.5, "no grad_norm/<layer> scalars in this run", ha="center", transform=ax.transAxes)
        return fig
    curves = [(f"step {steps[0]} (start)", [r[0] for r in rows]), *stall_profiles(run)]
    if len(steps) > 1:
        curves.append((f"step {steps[-1]} (end)", [r[-1] for r in rows]))
    for i, (label, norms) in enumerate(curves):
        style = {"linestyle": "--", "color": "gray"} if i == 0 else {}
        ax.plot(range(len(layers)), [max(v, 1e-30) for v in norms], marker="o", label=label, **style)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"gradient flow at each stall: {run.path.name}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_grad_heatmap(run: Run):
    """log10 gradient norm as a layer x step image."""
    plt = _figure()
    layers, steps, rows = run.grad_matrix()
    fig, ax = plt.subplots(figsize=(9, 0.4 * max(len(layers), 4) + 1.5))
    if not layers:
        ax.text(0.5, 0.5, "no grad_norm/<layer> scalars in this run", ha="center", transform=ax.transAxes)
        return fig
    image = [[math.log10(v) if v > 0 else float("nan") for v in row] for row in rows]
    first, last = (steps[0], steps[-1]) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)  # one logged step
    mesh = ax.imshow(image, aspect="auto", interpolation="nearest", extent=(first, last, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("step")
    ax.set_title("log10 gradient norm per layer")
    fig.colorbar(mesh, ax=ax)
    fig.tight_layout()
    return fig


class NoFit(RunError):
    """What the model learned cannot be drawn for this run; the message says why."""


@dataclass
class Fitted:
    """A run's model at a checkpoint and the data it was fitted to (features ``x``, labels ``y``), with
    the true P(y=1) over ``x_true`` when the data module knows it (the dnnex grid)."""

    model: Any
    checkpoint: Path
    x: Any
    y: Any
    x_true: Any = None
    prob_true: Any = None

    @property
    def dims(self) -> int:
        return self.x.shape[1]


def load_fitted(run: Run) -> Fitted:
    """The run's model at ``checkpoints/last.ckpt`` (else the newest checkpoint) and its training data,
    rebuilt from ``config.yaml``'s ``data`` section; raises ``NoFit`` when there is no checkpoint, no data
    section or the inputs are not 1-D or 2-D."""
    from lightning.pytorch.cli import instantiate_class

    from src.models import MLPClassifier

    folder = run.path / "checkpoints"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    checkpoint = folder / "last.ckpt" if (folder / "last.ckpt").is_file() else (found[-1] if found else None)
    if checkpoint is None:
        raise NoFit(f"no checkpoint in {folder} (trainer.enable_checkpointing was false?)")
    if not isinstance(run.config.get("data"), dict) or "class_path" not in run.config["data"]:
        raise NoFit(f"{run.path / 'config.yaml'} names no data class (data.class_path)")
    try:
        model = MLPClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # a foreign or torn checkpoint
        raise NoFit(f"{checkpoint}: cannot be loaded as the template's model ({one_line(err)})") from None
    if model.hparams.in_features not in (1, 2):
        raise NoFit(f"the inputs are {model.hparams.in_features}-D; the fit is drawn for 1-D and 2-D data")
    try:  # the data as the run's config names it (a CSV path is read relative to this folder)
        datamodule = instantiate_class((), run.config["data"])
        datamodule.setup("fit")
        features, labels, *_ = datamodule.train_set.tensors
        evaluation = datamodule.val_set.tensors if datamodule.val_set is not None else ()
    except Exception as err:  # a moved data file, a data module that is not in memory
        raise NoFit(f"the data of {run.path / 'config.yaml'} cannot be rebuilt here ({one_line(err)})") from None
    x_true, prob_true = (evaluation[0], evaluation[2]) if len(evaluation) == 3 else (None, None)
    model.eval()
    return Fitted(model, checkpoint, features.float(), labels, x_true, prob_true)


def plot_fitted_curve(fitted: Fitted, run: Run | None = None, ax=None):
    """1-D data: the model's P(y=1) against x, over the true curve (when known) and the 0/1 labels."""
    import torch

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax)
    x, y = fitted.x[:, 0], fitted.y.float()
    jitter = torch.linspace(-0.03, 0.03, len(y))[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    ax.scatter(x, y + jitter, s=3, alpha=0.25, color="gray", label="data (y = 0 / 1)")
    if fitted.prob_true is not None:
        ax.plot(fitted.x_true[:, 0], fitted.prob_true, color="black", linewidth=2, label="true P(y=1)")
    grid = torch.linspace(float(x.min()), float(x.max()), 500).unsqueeze(1)
    with torch.no_grad():
        ax.plot(grid[:, 0], fitted.model.predict_proba(grid), color="tab:red", linewidth=2, label="fitted P(y=1)")
    mae = run.last("val/prob_mae") if run is not None else None
    name = run.path.name if run is not None else fitted.checkpoint.name
    ax.set_title(f"fitted curve: {name}" + (f" (val/prob_mae {mae:.3f})" if mae is not None else ""), fontsize=10)
    ax.set_xlabel("x")
    ax.set_ylabel("P(y = 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_decision_regions(fitted: Fitted, run: Run | None = None, ax=None):
    """2-D data: the class the model predicts over the plane, with the training points."""
    import torch
    from matplotlib.colors import ListedColormap

    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 5.5)) if ax is None else (ax.figure, ax)
    x, y = fitted.x, fitted.y
    low, high = x.min(0).values - 1.5, x.max(0).values + 1.5
    gx, gy = torch.meshgrid(torch.linspace(low[0], high[0], 300), torch.linspace(low[1], high[1], 300), indexing="xy")
    with torch.no_grad():
        proba = fitted.model.predict_proba(torch.stack([gx.flatten(), gy.flatten()], 1))
    classes = int(y.max()) + 1 if proba.ndim == 1 else proba.shape[1]
    predicted = (proba > 0.5).long() if proba.ndim == 1 else proba.argmax(1)
    colors = plt.get_cmap("tab10").colors[: max(classes, 2)]
    ax.contourf(gx, gy, predicted.reshape(gx.shape), levels=torch.arange(len(colors) + 1) - 0.5,
                cmap=ListedColormap(colors), alpha=0.3)  # fmt: skip
    for label in range(len(colors)):
        chosen = y == label
        ax.scatter(x[chosen, 0], x[chosen, 1], s=14, color=colors[label], edgecolor="black", linewidth=0.4,
                   label=f"class {label}")  # fmt: skip
    accuracy = (
        (fitted.model.predict_proba(x) > 0.5).long() if proba.ndim == 1 else fitted.model.predict_proba(x).argmax(1)
    )
    train_acc = float((accuracy == y).float().mean())
    name = run.path.name if run is not None else fitted.checkpoint.name
    ax.set_title(f"decision regions: {name} (train accuracy {train_acc:.3f})", fontsize=10)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_fit(run: Run, ax=None):
    """What the model learned: the fitted curve (1-D data) or the decision regions (2-D data)."""
    fitted = load_fitted(run)
    return (plot_fitted_curve if fitted.dims == 1 else plot_decision_regions)(fitted, run, ax)


PLOTS = {"loss.png": plot_loss, "gradient_flow.png": plot_gradient_flow, "grad_heatmap.png": plot_grad_heatmap}


FIT_PLOTS = {1: ("fitted_curve.png", plot_fitted_curve), 2: ("decision_regions.png", plot_decision_regions)}


def write_plots(run: Run, out_dir: Path | None = None) -> tuple[list[Path], str | None]:
    """The PNGs written, and why the picture of what the model learned was left out (``None`` if drawn)."""
    out_dir = Path(out_dir or run.path)
    written = []
    for name, plot in PLOTS.items():
        fig = plot(run)
        fig.savefig(out_dir / name, dpi=110)
        fig.clf()
        written.append(out_dir / name)
    try:
        fitted = load_fitted(run)
    except NoFit as why:
        return written, str(why)
    name, plot = FIT_PLOTS[fitted.dims]
    fig = plot(fitted, run)
    fig.savefig(out_dir / name, dpi=110)
    fig.clf()
    return [*written, out_dir / name], None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (lightning_logs/version_N), or a folder of runs: the newest")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default: the run directory)")
    args = parser.parse_args(argv)
    with one_line_errors((RunError, OSError)):
        run = load_run(args.run_dir)
        print(summary(run))
        if not args.no_plots:
            written, left_out = write_plots(run, args.out)
            for path in written:
                print(f"wrote {path}")
            if left_out is not None:
                print(f"no picture of what the model learned: {left_out}")


if __name__ == "__main__":
    main()
