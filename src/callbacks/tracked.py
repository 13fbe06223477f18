"""An ``EarlyStopping`` whose attributes tell the truth about the rule that decides in its place."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn

from .plateau_rule import PlateauTracker


class TrackedEarlyStopping(EarlyStopping):
    """An ``EarlyStopping`` whose own rule never runs (a subclass overrides its hooks): its
    attributes read from, and write to, ``self.tracker`` (a :class:`~.plateau_rule.PlateauTracker`),
    so that ``wait_count``, ``best_score``, ``min_delta`` (signed as ``EarlyStopping`` signs it:
    negative for mode ``min``) and ``patience`` tell the truth about the rule that decides."""

    tracker: PlateauTracker

    wait_count = property(lambda self: self.tracker.wait, lambda self, v: setattr(self.tracker, "wait", int(v)))
    best_score = property(
        lambda self: torch.tensor(self.tracker.best), lambda self, v: setattr(self.tracker, "best", float(v))
    )
    min_delta = property(
        lambda self: self.tracker.min_delta * (1.0 if self.tracker.mode == "max" else -1.0),
        lambda self, v: setattr(self.tracker, "min_delta", abs(float(v))),
    )
    patience = property(lambda self: self.tracker.patience, lambda self, v: setattr(self.tracker, "patience", int(v)))

    @staticmethod
    def _should_skip_check(trainer: L.Trainer) -> bool:
        # EarlyStopping's guard: only a real fit counts.
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or bool(trainer.fast_dev_run)


def stops_at_non_finite(callbacks: list[L.Callback]) -> list[EarlyStopping]:
    """The ``EarlyStopping`` callbacks (not the trackers) that end a fit on a NaN or infinite metric
    (``check_finite``, on by default): at a divergence that ``PlateauEscape`` rolls back, they end the fit."""
    return [cb for cb in callbacks if isinstance(cb, EarlyStopping) and not isinstance(cb, TrackedEarlyStopping)
            and cb.check_finite]  # fmt: skip
