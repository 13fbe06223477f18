"""Grids of runs: ``python -m src.study FILE`` (see ``cli.py`` and the README beside it).

``spec`` reads and checks a study file, ``runner`` runs its points, ``table`` and ``plot`` summarise them.
"""

from .cli import main
from .plot import plot_final_loss
from .probes import FirstEpochBelow
from .runner import prepare_run, run_point
from .spec import Study, StudyError, check_options, grid, load_study, run_args, run_name, stacked
from .table import aggregate, axis_columns, load_summary, write_outputs

__all__ = [
    "FirstEpochBelow", "Study", "StudyError", "aggregate", "axis_columns", "check_options", "grid", "load_study",
    "load_summary", "main", "plot_final_loss", "prepare_run", "run_args", "run_name", "run_point", "stacked",
    "write_outputs",
]  # fmt: skip
