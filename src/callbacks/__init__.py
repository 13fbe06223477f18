"""Callbacks that diagnose and fix a stalled run, each usable on its own in any Lightning project.

The classes load on first use, so that reading :mod:`.names` (as the report does) needs no torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_HOME = {
    "EpochProgressBar": "progress",
    "EscapeAction": "escape_actions",
    "FiniteModelCheckpoint": "reliability",
    "GracefulStop": "reliability",
    "GradNormMonitor": "grad_norm",
    "GradNormRecorder": "grad_flow",
    "LayerStatsMonitor": "layer_monitor",
    "PlateauDetector": "plateau",
    "PlateauEscape": "escape",
    "TensorBoardDashboard": "dashboard",
}
__all__ = [
    "EpochProgressBar",
    "EscapeAction",
    "FiniteModelCheckpoint",
    "GracefulStop",
    "GradNormMonitor",
    "GradNormRecorder",
    "LayerStatsMonitor",
    "PlateauDetector",
    "PlateauEscape",
    "TensorBoardDashboard",
]

if TYPE_CHECKING:
    from .dashboard import TensorBoardDashboard
    from .escape import PlateauEscape
    from .escape_actions import EscapeAction
    from .grad_flow import GradNormRecorder
    from .grad_norm import GradNormMonitor
    from .layer_monitor import LayerStatsMonitor
    from .plateau import PlateauDetector
    from .progress import EpochProgressBar
    from .reliability import FiniteModelCheckpoint, GracefulStop


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
