"""Get a stalled run moving: switch SGD to momentum, or raise the learning rate, one step per stall."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .escape_actions import DEFAULT_ACTIONS, EscapeAction, apply_action, as_action, check_applicable
from .names import OPTIM_LR, OPTIM_MOMENTUM, PLATEAU_ACTIONS_TEXT
from .plateau import PlateauDetector


class PlateauEscape(Callback):
    r"""Acts on the stalls a :class:`~src.callbacks.PlateauDetector` reports: one action per stall, in order.

    The default sequence is the source study's remedy for a stalled sigmoid net trained by plain SGD:
    momentum 0.9, then momentum 0.99, then the learning rate times 5 (at most 0.5), then times 2
    (at most 1.0). Each action
    changes the optimizer's ``param_groups`` in place (see :func:`apply_action`), is logged
    (``optim/lr`` and ``optim/momentum`` scalars and a text entry) and is recorded in
    ``stall_events.json`` next to the stall that caused it. Divergence events are never acted on.

    Which actions are spent is part of the checkpoint, so a resumed run continues the sequence;
    the optimizer's own state (the switched momentum and lr) is restored by Lightning.

    Args:
        actions: The actions, in order, as a YAML list such as
            ``[{momentum: 0.9}, {momentum: 0.99, nesterov: true}, {lr_factor: 10, max_lr: 1.0}]``.
        on_exhausted: What to do on a stall once every action is spent: ``continue`` training,
            or ``stop`` it with the reason stated.
        restore_lr_below: A raised lr is a kick, not a new setting: once the monitored value has
            fallen below this fraction of its value at the stall that caused the last lr raise
            (above its inverse with ``mode: max``), the run is out of the stall and every lr raise
            is undone (momentum changes stay). The lr that got a net off a plateau tends to blow it
            up after. ``null`` keeps the raised lr.

    Raises:
        ValueError: At construction for a malformed action; at fit start when an action cannot apply
            to the optimizer (momentum on Adam), or when the Trainer has no ``PlateauDetector``.

    Example::

        from src.callbacks import GradNormMonitor, PlateauDetector, PlateauEscape
        callbacks = [GradNormMonitor(), PlateauDetector(patience=100), PlateauEscape()]
    """

    def __init__(
        self,
        actions: list[EscapeAction] | None = None,
        on_exhausted: Literal["continue", "stop"] = "continue",
        restore_lr_below: float | None = 0.5,
    ) -> None:
        super().__init__()
        if on_exhausted not in ("continue", "stop"):
            raise ValueError(f"PlateauEscape: on_exhausted must be 'continue' or 'stop', got {on_exhausted!r}")
        self.actions = [self._as_action(a) for a in (DEFAULT_ACTIONS if actions is None else actions)]
        if not self.actions:
            raise ValueError("PlateauEscape: actions is empty; give at least one, or leave it out for the defaults")
        if restore_lr_below is not None and not 0 < restore_lr_below < 1:
            raise ValueError(f"PlateauEscape: restore_lr_below must be in (0, 1) or null, got {restore_lr_below}")
        self.on_exhausted = on_exhausted
        self.restore_lr_below = restore_lr_below
        self.spent = 0
        self.history: list[dict[str, Any]] = []
        self.lr_scale = 1.0  # product of the lr raises in force
        self.raised_at: float | None = None  # monitored value at the stall that caused the last raise
        self._detector: PlateauDetector | None = None

    @staticmethod
    def _as_action(action: EscapeAction | dict[str, Any]) -> EscapeAction:
        try:
            return as_action(action)
        except ValueError as err:
            raise ValueError(f"PlateauEscape: {err}") from None

    @property
    @override
    def state_key(self) -> str:
        # Lightning asks for it around every hook call; the actions are fixed at construction.
        if getattr(self, "_state_key", None) is None:
            self._state_key = self._generate_state_key(actions=[a.describe() for a in self.actions])
        return self._state_key

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        detectors = [cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector)]
        if not detectors:
            raise ValueError("PlateauEscape needs a PlateauDetector in trainer.callbacks to tell it about stalls")
        for detector in detectors:
            detector.add_listener(self.on_stall)
        detectors[0].add_check_listener(self.on_check)
        self._detector = detectors[0]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for action in self.actions:
                check_applicable(optimizer, action)

    def on_stall(self, trainer: L.Trainer, pl_module: L.LightningModule, event: dict[str, Any]) -> None:
        """Apply the next action for a stall event (called by the PlateauDetector)."""
        if event["kind"] == "divergence" and self.lr_scale != 1.0:
            # Never escape into divergence silently: say which lr raise preceded it.
            last = next(r for r in reversed(self.history) if r.get("lr_raise"))
            note = f"none: diverged after '{last['action']}' at epoch {last['epoch']} (lr {last['lr'][0]:g})"
            event["actions"].append({"action": note, "epoch": event["epoch"], "step": event["step"]})
        if event["kind"] != "stall":
            return
        if self.spent >= len(self.actions):
            if self.on_exhausted == "stop":
                trainer.should_stop = True
                event["actions"].append({"action": "stop: every escape action is spent"})
                rank_zero_info(f"PlateauEscape: still stalled after {len(self.actions)} actions; stopping")
            return
        action = self.actions[self.spent]
        self.spent += 1
        lr_before = float(trainer.optimizers[0].param_groups[0]["lr"])
        settings = self._apply(trainer, action)
        if action.lr_factor is not None and lr_before > 0:
            self.lr_scale *= settings["lr"][0] / lr_before
            self.raised_at = float(event["value"])
        self._record(trainer, event, action.describe(), settings, lr_raise=action.lr_factor is not None)

    @staticmethod
    def _apply(trainer: L.Trainer, action: EscapeAction) -> dict[str, list[float]]:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        settings: dict[str, list[float]] = {}
        for optimizer in trainer.optimizers:
            settings = apply_action(optimizer, action, schedulers)
        return settings

    def on_check(self, trainer: L.Trainer, pl_module: L.LightningModule, value: float) -> None:
        """Undo the lr raises once the monitored ``value`` says the run is out of the stall."""
        # Only the detector calls this (set up in `setup`), and only after it reported a stall.
        if self.restore_lr_below is None or self.raised_at is None or not math.isfinite(value):
            return
        if self._detector.mode == "max":
            escaped = value >= self.raised_at / self.restore_lr_below
        else:
            escaped = value <= self.raised_at * self.restore_lr_below
        if not escaped:
            return
        settings = self._apply(trainer, EscapeAction(lr_factor=1 / self.lr_scale))
        self.lr_scale, self.raised_at = 1.0, None
        event = next(e for e in reversed(self._detector.events) if e["kind"] == "stall")
        what = f"lr restored (out of the stall: {value:.4g} vs {float(event['value']):.4g})"
        self._record(trainer, event, what, settings, epoch=trainer.current_epoch, step=trainer.global_step)
        self._detector.save_events(trainer)

    def _record(
        self,
        trainer: L.Trainer,
        event: dict[str, Any],
        what: str,
        settings: dict[str, list[float]],
        epoch: int | None = None,
        step: int | None = None,
        lr_raise: bool = False,
    ) -> None:
        epoch = event["epoch"] if epoch is None else epoch
        step = event["step"] if step is None else step
        record = {"action": what, "epoch": epoch, "step": step, **settings}
        if lr_raise:
            record["lr_raise"] = True  # what `on_stall` names when a divergence follows
        event["actions"].append(record)
        self.history.append(record)
        rank_zero_info(f"PlateauEscape: epoch {epoch}: {what} -> lr {settings['lr']}")
        for logger in trainer.loggers:
            logger.log_metrics({OPTIM_LR: settings["lr"][0], OPTIM_MOMENTUM: settings["momentum"][0]}, step)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text(PLATEAU_ACTIONS_TEXT, f"epoch {epoch}: {what}", step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"spent": self.spent, "history": self.history, "lr_scale": self.lr_scale, "raised_at": self.raised_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.spent = state_dict["spent"]
        self.history = list(state_dict["history"])
        self.lr_scale = state_dict.get("lr_scale", 1.0)
        self.raised_at = state_dict.get("raised_at")
