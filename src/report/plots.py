"""The run's pictures: the loss with its stalls, the gradient flow at each stall, the layer x step heat map.

Each function returns its matplotlib figure; :func:`~.cli.write_plots` saves and closes them.
"""

from __future__ import annotations

import math
import sys

from src.callbacks.events import EventKind
from src.names import DEAD, SATURATED, TRAIN_LOSS, UPDATE_RATIO_LOG10, VAL_LOSS

from .run import Run


def pyplot():
    """matplotlib.pyplot, drawing to files (Agg) outside a notebook."""
    import matplotlib

    if not _in_notebook():
        matplotlib.use("Agg")  # files only; a notebook keeps its inline backend
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def plot_loss(run: Run):
    """train/val loss against step, log scale, with a line at each stall/divergence and its actions."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for tag in (TRAIN_LOSS, VAL_LOSS):
        if tag in run.scalars:
            steps, values = run.scalars[tag]
            ax.plot(steps, [max(v, 1e-12) for v in values], label=tag)
    for event in run.events:
        color = "tab:red" if event.kind is EventKind.DIVERGENCE else "tab:gray"
        ax.axvline(event.step, color=color, linestyle="--", linewidth=0.8)
        at_event = [a for a in event.actions if a.step in (None, event.step)]
        text = " / ".join([event.diagnosis or event.kind.value, *(_short(a.action) for a in at_event)])
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
    plt = pyplot()
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
    plt = pyplot()
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


def plot_layer_activity(run: Run, ax=None):
    """Each layer's saturated share over training (bounded activations: the picture of Glorot & Bengio
    2010), or its dead share (the ReLU family), with the stalls marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5)) if ax is None else (ax.figure, ax)
    series, what = run.per_layer(SATURATED), "saturated"
    if not series:
        series, what = run.per_layer(DEAD), "dead"
    if not series:
        ax.text(0.5, 0.5, "no saturated/ or dead/ scalars in this run", ha="center", transform=ax.transAxes)
        return fig
    colors = plt.get_cmap("viridis")
    for i, (name, (steps, values)) in enumerate(series.items()):
        ax.plot(steps, values, label=name, color=colors(i / max(len(series) - 1, 1)))
    for event in run.events:
        ax.axvline(event.step, color="tab:gray", linestyle="--", linewidth=0.8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} share")
    unit = "outputs at a bound of the activation" if what == "saturated" else "units with no positive output"
    ax.set_title(f"{what} share per layer ({unit}): {run.path.name}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_update_ratio(run: Run, ax=None):
    """log10 of each layer's update-to-weight ratio over training, with the reference at -3."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5)) if ax is None else (ax.figure, ax)
    series = run.per_layer(UPDATE_RATIO_LOG10)
    if not series:
        ax.text(0.5, 0.5, "no update_ratio_log10/ scalars in this run", ha="center", transform=ax.transAxes)
        return fig
    colors = plt.get_cmap("viridis")
    for i, (name, (steps, values)) in enumerate(series.items()):
        ax.plot(steps, [max(v, -12.0) for v in values], label=name, color=colors(i / max(len(series) - 1, 1)))
    ax.axhline(-3, color="black", linestyle="--", linewidth=1, label="-3 (reference)")
    for event in run.events:
        ax.axvline(event.step, color="tab:gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("log10 ||ΔW|| / ||W||")
    ax.set_title(f"update-to-weight ratio per layer: {run.path.name}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _short(action: str) -> str:
    """An action as a stall line's label has room for: what was undone says so in a word.

    >>> _short("no gain on probation (best 0.69 vs 0.69): 'momentum 0.9' withdrawn (settings of epoch 120)")
    'withdrawn'
    >>> _short("momentum 0.99, lr x5 (max 0.5)")
    'momentum 0.99, lr x5'
    """
    for word in ("withdrawn", "rolled back"):
        if word in action:
            return word
    return action.split(" (")[0]
