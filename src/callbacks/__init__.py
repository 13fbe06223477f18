from src.callbacks.escape import EscapeAction, PlateauEscape
from src.callbacks.grad_norm import GradNormMonitor
from src.callbacks.plateau import PlateauDetector

__all__ = ["EscapeAction", "GradNormMonitor", "PlateauDetector", "PlateauEscape"]
