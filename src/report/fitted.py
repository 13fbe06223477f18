"""What the model learned, from a run's checkpoint and the data its config names: a 1-D fitted curve or
2-D decision regions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.errors import one_line
from src.names import VAL_PROB_MAE

from .plots import pyplot
from .run import Run, RunError


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
    rebuilt from ``config.yaml``: the LightningModule its ``model`` section names (``class_path``; the
    template's ``MLPClassifier`` when it names none, as the CLI's default) and its ``data`` section.
    Raises ``NoFit`` when there is no checkpoint, no data section or the inputs are not 1-D or 2-D."""
    from lightning.pytorch.cli import instantiate_class

    folder = run.path / "checkpoints"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    checkpoint = folder / "last.ckpt" if (folder / "last.ckpt").is_file() else (found[-1] if found else None)
    if checkpoint is None:
        raise NoFit(f"no checkpoint in {folder} (trainer.enable_checkpointing was false?)")
    if not isinstance(run.config.get("data"), dict) or "class_path" not in run.config["data"]:
        raise NoFit(f"{run.path / 'config.yaml'} names no data class (data.class_path)")
    model_class = module_class(run.config.get("model"))
    try:
        model = model_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # a foreign or torn checkpoint
        raise NoFit(f"{checkpoint}: cannot be loaded as {model_class.__name__} ({one_line(err)})") from None
    try:  # the data as the run's config names it (a CSV path is read relative to this folder)
        datamodule = instantiate_class((), run.config["data"])
        datamodule.setup("fit")
        features, labels, *_ = datamodule.train_set.tensors
        evaluation = datamodule.val_set.tensors if datamodule.val_set is not None else ()
    except Exception as err:  # a moved data file, a data module that is not in memory
        raise NoFit(f"the data of {run.path / 'config.yaml'} cannot be rebuilt here ({one_line(err)})") from None
    if features.ndim != 2 or features.shape[1] not in (1, 2):
        raise NoFit(f"the inputs are {tuple(features.shape[1:])}; the fit is drawn for 1-D and 2-D data")
    x_true, prob_true = (evaluation[0], evaluation[2]) if len(evaluation) == 3 else (None, None)
    model.eval()
    return Fitted(model, checkpoint, features.float(), labels, x_true, prob_true)


def module_class(section: Any) -> type:
    """The LightningModule class a config's ``model`` section names (``MLPClassifier`` without a class_path)."""
    import importlib

    from src.models import MLPClassifier

    if not isinstance(section, dict) or "class_path" not in section:
        return MLPClassifier
    module, _, name = section["class_path"].rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise NoFit(f"the model class {section['class_path']} cannot be imported here ({one_line(err)})") from None


def probabilities(model: Any, x: Any) -> Any:
    """P(class) of ``x``: the model's ``predict_proba`` if it has one, else from its logits (one output:
    sigmoid, P(y=1); several: softmax)."""
    import torch

    with torch.no_grad():
        if hasattr(model, "predict_proba"):
            return model.predict_proba(x)
        logits = model(x)
        return torch.sigmoid(logits.squeeze(-1)) if logits.shape[-1] == 1 else torch.softmax(logits, -1)


def plot_fitted_curve(fitted: Fitted, run: Run | None = None, ax=None):
    """1-D data: the model's P(y=1) against x, over the true curve (when known) and the 0/1 labels."""
    import torch

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax)
    x, y = fitted.x[:, 0], fitted.y.float()
    jitter = torch.linspace(-0.03, 0.03, len(y))[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    ax.scatter(x, y + jitter, s=3, alpha=0.25, color="gray", label="data (y = 0 / 1)")
    if fitted.prob_true is not None:
        ax.plot(fitted.x_true[:, 0], fitted.prob_true, color="black", linewidth=2, label="true P(y=1)")
    grid = torch.linspace(float(x.min()), float(x.max()), 500).unsqueeze(1)
    ax.plot(grid[:, 0], probabilities(fitted.model, grid), color="tab:red", linewidth=2, label="fitted P(y=1)")
    mae = run.last(VAL_PROB_MAE) if run is not None else None
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

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5)) if ax is None else (ax.figure, ax)
    x, y = fitted.x, fitted.y
    low, high = x.min(0).values - 1.5, x.max(0).values + 1.5
    gx, gy = torch.meshgrid(torch.linspace(low[0], high[0], 300), torch.linspace(low[1], high[1], 300), indexing="xy")
    proba = probabilities(fitted.model, torch.stack([gx.flatten(), gy.flatten()], 1))
    classes = int(y.max()) + 1 if proba.ndim == 1 else proba.shape[1]
    predicted = (proba > 0.5).long() if proba.ndim == 1 else proba.argmax(1)
    colors = plt.get_cmap("tab10").colors[: max(classes, 2)]
    ax.contourf(gx, gy, predicted.reshape(gx.shape), levels=torch.arange(len(colors) + 1) - 0.5,
                cmap=ListedColormap(colors), alpha=0.3)  # fmt: skip
    for label in range(len(colors)):
        chosen = y == label
        ax.scatter(x[chosen, 0], x[chosen, 1], s=14, color=colors[label], edgecolor="black", linewidth=0.4,
                   label=f"class {label}")  # fmt: skip
    on_points = probabilities(fitted.model, x)
    accuracy = (on_points > 0.5).long() if proba.ndim == 1 else on_points.argmax(1)
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
