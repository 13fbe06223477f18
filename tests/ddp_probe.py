"""A callback the DDP test adds from the command line: each rank saves what must agree across ranks."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from src.callbacks import PlateauEscape


class DumpRankState(L.Callback):
    def on_train_end(self, trainer, pl_module):
        escape = next(cb for cb in trainer.callbacks if isinstance(cb, PlateauEscape))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups]
        state = {
            "spent": escape.spent,
            "param_groups": groups,
            "weights": torch.cat([p.detach().flatten().cpu() for p in pl_module.parameters()]),
        }
        torch.save(state, Path(os.environ["RANK_STATE_DIR"]) / f"rank{trainer.global_rank}.pt")
