"""A callback the DDP test adds from the command line: each rank saves what must agree across ranks."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from src.callbacks import PlateauDetector, PlateauEscape
from src.callbacks.layer_stats import shared_statistics


class DumpRankState(L.Callback):
    def on_train_end(self, trainer, pl_module):
        escape = next(cb for cb in trainer.callbacks if isinstance(cb, PlateauEscape))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups]
        optimizer = trainer.optimizers[0]
        stats = shared_statistics(trainer)  # the LayerStatsMonitor's and the detector's
        detector = next(cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector))
        state = {
            "event_values": [event.value for event in detector.events],
            "layer_stats": {name: asdict(s) for name, s in stats.latest.items()},
            "layer_stats_step": stats.finished_step,
            "spent": escape.spent,
            "param_groups": groups,
            "weights": torch.cat([p.detach().flatten().cpu() for p in pl_module.parameters()]),
            "optimizer_state": [
                v.detach().flatten().cpu()
                for p in pl_module.parameters()
                for v in optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor)
            ],
        }
        torch.save(state, Path(os.environ["RANK_STATE_DIR"]) / f"rank{trainer.global_rank}.pt")


class Pace(L.Callback):
    """Slows a toy run to ``seconds`` per epoch and touches ``RUN_MARKER`` at epoch 10, so a test can
    signal the process while it is training. Sleeping changes no numbers."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module):
        time.sleep(self.seconds)
        if trainer.current_epoch == 10 and os.environ.get("RUN_MARKER"):
            Path(os.environ["RUN_MARKER"]).touch()


class DumpMetrics(L.Callback):
    """Each rank saves its callback_metrics at the end of fit, to compare across ranks."""

    def on_train_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save(metrics, Path(os.environ["RANK_STATE_DIR"]) / f"metrics{trainer.global_rank}.pt")
