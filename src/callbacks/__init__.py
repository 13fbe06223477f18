from src.callbacks.dashboard import TensorBoardDashboard
from src.callbacks.escape import EscapeAction, PlateauEscape
from src.callbacks.grad_norm import GradNormMonitor
from src.callbacks.plateau import PlateauDetector
from src.callbacks.reliability import FiniteModelCheckpoint, GracefulStop

__all__ = [
    "EscapeAction",
    "FiniteModelCheckpoint",
    "GracefulStop",
    "GradNormMonitor",
    "PlateauDetector",
    "PlateauEscape",
    "TensorBoardDashboard",
]
