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
from pathlib import Path

from src.errors import one_line_errors

from .fitted import NoFit, load_fitted, plot_decision_regions, plot_fitted_curve
from .plots import (
    plot_grad_heatmap,
    plot_gradient_flow,
    plot_layer_activity,
    plot_loss,
    plot_update_ratio,
    pyplot,
)
from .run import Run, RunError, load_run
from .text import summary

PLOTS = {
    "loss.png": plot_loss,
    "gradient_flow.png": plot_gradient_flow,
    "grad_heatmap.png": plot_grad_heatmap,
    "layer_activity.png": plot_layer_activity,
    "update_ratio.png": plot_update_ratio,
}


FIT_PLOTS = {1: ("fitted_curve.png", plot_fitted_curve), 2: ("decision_regions.png", plot_decision_regions)}


def write_plots(run: Run, out_dir: Path | None = None) -> tuple[list[Path], str | None]:
    """The PNGs written, and why the picture of what the model learned was left out (``None`` if drawn)."""
    out_dir = Path(out_dir or run.path)
    written = []
    plt = pyplot()
    for name, plot in PLOTS.items():
        fig = plot(run)
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    try:
        fitted = load_fitted(run)
    except NoFit as why:
        return written, str(why)
    name, plot = FIT_PLOTS[fitted.dims]
    fig = plot(fitted, run)
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
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
