"""The lines printed when a fit ends: final metrics, stalls, where the run is and how to look at it."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from src.callbacks.events import EventKind
from src.callbacks.plateau import PlateauDetector
from src.callbacks.plateau_rule import describe_event
from src.callbacks.reliability import FiniteModelCheckpoint
from src.names import EVENTS_FILE, metric

SHOWN_EVENTS = 10


def run_summary(trainer: L.Trainer) -> str:
    """The end-of-fit summary. Call it on every rank: ``trainer.log_dir`` is a collective under DDP."""
    metrics = trainer.callback_metrics
    lines = [f"Finished after {trainer.current_epoch} epochs ({trainer.global_step} steps)."]
    for stage in ("train", "val"):
        values = [
            f"{name} {metrics[metric(stage, name)].item():.4f}"
            for name in ("loss", "acc", "prob_mae")
            if metric(stage, name) in metrics
        ]
        if values:
            lines.append(f"  {stage:<5} " + ", ".join(values))
    detectors = [cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector)]
    for detector in detectors:
        lines.append(f"  {len(detector.events)} stall/divergence event(s) on {detector.monitor}")
        lines.extend(f"    {describe_event(event)}" for event in detector.events[:SHOWN_EVENTS])
        if len(detector.events) > SHOWN_EVENTS:
            lines.append(f"    ... {len(detector.events) - SHOWN_EVENTS} more in {EVENTS_FILE}")
    if trainer.log_dir:
        lines.append(f"  logs  {trainer.log_dir}")
    lines.extend(_checkpoint_lines(trainer.checkpoint_callback))
    for detector in detectors:
        divergence = next((e for e in detector.events if e.kind is EventKind.DIVERGENCE), None)
        if divergence is not None:
            lines.append(
                f"  DIVERGED at epoch {divergence.epoch}: {detector.monitor} = {divergence.value}; "
                "lower the learning rate (the checkpoints are from before it)"
            )
    root = trainer.logger.root_dir if trainer.logger is not None else "lightning_logs"
    lines.append(f"  view  tensorboard --logdir {root}")
    return "\n".join(lines)


def _checkpoint_lines(checkpoint: object) -> list[str]:
    last_path = getattr(checkpoint, "last_model_path", "")  # ModelCheckpoint's public attribute
    last = Path(last_path) if last_path else None
    skipped = checkpoint.skipped if isinstance(checkpoint, FiniteModelCheckpoint) else 0
    if last is not None and last.is_file():
        saved = checkpoint.saved_epoch if isinstance(checkpoint, FiniteModelCheckpoint) else None
        note = f" (from epoch {saved}, before the divergence)" if skipped and saved is not None else ""
        return [f"  last  {last}{note}"]
    if skipped:
        return ["  last  none: the run diverged before the first checkpoint was due"]
    return []
