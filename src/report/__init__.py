"""Read a run back from its files and show what happened: ``python -m src.report RUN_DIR`` (see ``cli.py``).

``run`` reads the files, ``text`` prints the table, ``plots`` draws the loss and the gradients,
``fitted`` draws what the model learned from its checkpoint.
"""

from .cli import main, write_plots
from .fitted import Fitted, NoFit, load_fitted, plot_decision_regions, plot_fit, plot_fitted_curve
from .plots import (
    plot_grad_heatmap,
    plot_gradient_flow,
    plot_layer_activity,
    plot_loss,
    plot_update_ratio,
    stall_profiles,
)
from .run import Run, RunError, find_run, load_run
from .text import summary

__all__ = [
    "Fitted", "NoFit", "Run", "RunError", "find_run", "load_fitted", "load_run", "main", "plot_decision_regions",
    "plot_fit", "plot_fitted_curve", "plot_grad_heatmap", "plot_gradient_flow", "plot_layer_activity", "plot_loss",
    "plot_update_ratio", "stall_profiles",
    "summary", "write_plots",
]  # fmt: skip
