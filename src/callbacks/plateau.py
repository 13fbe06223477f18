"""Plateau detection with a diagnosis of why training stalled."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from src.callbacks.grad_norm import GradNormMonitor, GradProfile

Diagnosis = Literal["vanishing", "flat", "unclear"]
EVENTS_FILE = "stall_events.json"


class Status(Enum):
    """What one check of the monitored metric concluded."""

    WARMUP = "warmup"
    IMPROVED = "improved"
    WAITING = "waiting"
    COOLDOWN = "cooldown"
    PLATEAU = "plateau"
    DIVERGED = "diverged"


class PlateauTracker:
    """The decision rule, apart from Lightning: has the metric stopped improving?

    A value improves on the best so far when it beats it by more than ``min_delta``, relative to
    the best (``threshold_mode="rel"``) or absolute (``"abs"``), as in ``ReduceLROnPlateau``.
    After ``warmup`` checks, ``patience`` checks in a row without improvement make a plateau; then
    the counter restarts, and ``cooldown`` checks pass before waiting starts again. A value that is
    NaN or infinite, or worse than ``divergence_threshold``, is a divergence, never a plateau.
    """

    mode_dict = {"min": -1.0, "max": 1.0}

    def __init__(
        self,
        mode: str = "min",
        patience: int = 100,
        min_delta: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        warmup: int = 0,
        divergence_threshold: float | None = None,
    ) -> None:
        if mode not in self.mode_dict:
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown), ("warmup", warmup)):
            if value < (1 if name == "patience" else 0):
                raise ValueError(f"{name} must be >= {1 if name == 'patience' else 0}, got {value}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.threshold_mode, self.cooldown, self.warmup = threshold_mode, cooldown, warmup
        self.divergence_threshold = divergence_threshold
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_left = 0
        self.checks = 0

    def improves(self, value: float) -> bool:
        sign = self.mode_dict[self.mode]
        if math.isinf(self.best):
            return True
        margin = self.min_delta * abs(self.best) if self.threshold_mode == "rel" else self.min_delta
        return sign * (value - self.best) > margin

    def diverged(self, value: float) -> bool:
        if self.divergence_threshold is None:
            return False
        return value > self.divergence_threshold if self.mode == "min" else value < self.divergence_threshold

    def update(self, value: float) -> Status:
        self.checks += 1
        if not math.isfinite(value) or self.diverged(value):
            return Status.DIVERGED
        improved = self.improves(value)
        if improved:
            self.best = value
        if self.checks <= self.warmup:
            return Status.WARMUP
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
            return Status.IMPROVED if improved else Status.COOLDOWN
        if improved:
            self.wait = 0
            return Status.IMPROVED
        self.wait += 1
        if self.wait < self.patience:
            return Status.WAITING
        self.wait = 0
        self.cooldown_left = self.cooldown
        return Status.PLATEAU

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_left": self.cooldown_left, "checks": self.checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]
        self.cooldown_left, self.checks = state["cooldown_left"], state["checks"]


def diagnose(
    profiles: Sequence[GradProfile],
    vanishing_ratio: float = 1e-3,
    flat_norm: float = 1e-3,
    flat_spread: float = 100.0,
) -> Diagnosis:
    """Why a stall happened, from the per-layer gradient norms seen while it built up.

    Each weight layer's norms are summarised by the median over ``profiles`` of their log (ignoring exact zeros). Then:

    - ``vanishing``: the first layer's gradient is below ``vanishing_ratio`` times the last's: the
      early layers cannot learn (a deep sigmoid net: first/last 1e-7 and lower).
    - ``flat``: every layer's gradient is below ``flat_norm`` and the largest is within
      ``flat_spread`` times the smallest: an even, tiny profile, so the loss itself is flat there
      (a saddle, plateau or local minimum).
    - ``unclear``: neither, or no gradients were seen.
    """
    if not profiles:
        return "unclear"
    columns = [i for i, w in enumerate(profiles[-1].weight_layers) if w] or list(range(len(profiles[-1].norms)))
    # The median of log10 norms over the steps where the layer's gradient was not exactly 0: a step
    # whose gradient underflows to 0 in float32 must not decide the diagnosis.
    log_norm = [
        statistics.median([math.log10(p.norms[i]) for p in profiles if p.norms[i] > 0] or [-38.0]) for i in columns
    ]
    if log_norm[0] - log_norm[-1] < math.log10(vanishing_ratio):
        return "vanishing"
    if max(log_norm) < math.log10(flat_norm) and max(log_norm) - min(log_norm) < math.log10(flat_spread):
        return "flat"
    return "unclear"


StallListener = Callable[[L.Trainer, L.LightningModule, dict[str, Any]], None]
CheckListener = Callable[[L.Trainer, L.LightningModule, float], None]


class PlateauDetector(Callback):
    r"""Detects that a monitored metric has stopped improving, and diagnoses why.

    A check happens once per training epoch, at its end, when ``monitor`` is a training metric
    (``train/...``), otherwise after each validation run; ``check_on_train_epoch_end`` overrides
    that. ``patience`` counts checks, as in ``EarlyStopping``: with one check per epoch,
    ``patience=100`` means 100 epochs without an improvement larger than ``min_delta``.

    On a stall it records an event (epoch, step, value, and a diagnosis from the per-layer gradient
    norms over the patience window: ``vanishing``, ``flat`` or ``unclear``, see :func:`diagnose`),
    logs a ``plateau/stall`` scalar marker and a text entry, appends the event to
    ``stall_events.json`` in the run directory and keeps it in its state, so a resumed run knows it.
    A NaN or infinite value, or one worse than ``divergence_threshold``, is recorded as a
    ``divergence`` event instead, and stops training when ``stop_on_divergence`` is set.

    The gradient norms come from a :class:`~src.callbacks.GradNormMonitor` on the same Trainer, or
    from a silent one of its own when there is none. Under DDP the monitored value is averaged over
    the processes and the decision reduced, so every rank decides the same; a rank that misses the
    metric makes every rank skip that check rather than wait for it.

    Other callbacks (:class:`~src.callbacks.PlateauEscape`) subscribe with :meth:`add_listener`.

    Args:
        monitor: The metric to watch.
        mode: ``min`` if lower is better, ``max`` if higher is.
        patience: Checks without improvement that make a stall.
        min_delta: Smallest change that counts as an improvement (see ``threshold_mode``).
        threshold_mode: ``rel``: improve on the best by ``min_delta * |best|``; ``abs``: by ``min_delta``.
        cooldown: Checks after a stall before waiting starts again (time for a remedy to act).
        warmup: Checks at the start that can never end in a stall.
        check_on_train_epoch_end: Check at train epoch end (``True``) or after validation (``False``);
            ``None`` picks by the ``train/`` prefix of ``monitor``.
        vanishing_ratio: First-to-last layer gradient ratio below which the diagnosis is ``vanishing``.
        flat_norm: Gradient norm below which every layer must be for ``flat``.
        flat_spread: Largest-to-smallest layer ratio that still counts as an even (``flat``) profile.
        norms_every_n_steps: How often the detector's own norm monitor samples when the Trainer has
            no ``GradNormMonitor``; ``None`` takes the Trainer's ``log_every_n_steps``.
        stop_on_divergence: Stop training on a divergence.
        divergence_threshold: A value worse than this (above it for ``min``) is a divergence too, as
            in ``EarlyStopping``: a loss can blow up to 1e6 and stay finite. ``None``: only NaN/inf.
        good_enough: A plateau at a value at least this good (below it for ``min``, above for
            ``max``) is convergence, not a stall: no event. ``None``: every plateau is a stall.

    Raises:
        ValueError: On a bad argument, naming it.

    Example::

        from src.callbacks import GradNormMonitor, PlateauDetector
        trainer = Trainer(callbacks=[GradNormMonitor(), PlateauDetector(monitor="train/loss", patience=50)])
    """

    def __init__(
        self,
        monitor: str = "train/loss",
        mode: Literal["min", "max"] = "min",
        patience: int = 100,
        min_delta: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        warmup: int = 0,
        check_on_train_epoch_end: bool | None = None,
        vanishing_ratio: float = 1e-3,
        flat_norm: float = 1e-3,
        flat_spread: float = 100.0,
        norms_every_n_steps: int | None = None,
        stop_on_divergence: bool = True,
        good_enough: float | None = None,
        divergence_threshold: float | None = None,
    ) -> None:
        super().__init__()
        try:
            self.tracker = PlateauTracker(
                mode, patience, min_delta, threshold_mode, cooldown, warmup, divergence_threshold
            )
        except ValueError as err:
            raise ValueError(f"PlateauDetector: {err}") from None
        for name, value in (("vanishing_ratio", vanishing_ratio), ("flat_norm", flat_norm)):
            if not 0 < value < 1:
                raise ValueError(f"PlateauDetector: {name} must be in (0, 1), got {value}")
        if flat_spread < 1:
            raise ValueError(f"PlateauDetector: flat_spread must be >= 1, got {flat_spread}")
        self.monitor = monitor
        self.mode = mode
        self.check_on_train_epoch_end = (
            monitor.startswith("train") if check_on_train_epoch_end is None else check_on_train_epoch_end
        )
        self.thresholds = {"vanishing_ratio": vanishing_ratio, "flat_norm": flat_norm, "flat_spread": flat_spread}
        self.norms_every_n_steps = norms_every_n_steps
        self.stop_on_divergence = stop_on_divergence
        self.good_enough = good_enough
        self.events: list[dict[str, Any]] = []
        self._check_steps: deque[int] = deque(maxlen=patience + 1)
        self._listeners: list[StallListener] = []
        self._check_listeners: list[CheckListener] = []
        self._norms: GradNormMonitor | None = None
        self._own_norms = False
        self._warned_missing = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def add_listener(self, listener: StallListener) -> None:
        """Call ``listener(trainer, pl_module, event)`` on every stall and divergence event."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def add_check_listener(self, listener: CheckListener) -> None:
        """Call ``listener(trainer, pl_module, value)`` after every check, with the synced monitored value."""
        if listener not in self._check_listeners:
            self._check_listeners.append(listener)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, GradNormMonitor)]
        if monitors:
            self._norms, self._own_norms = monitors[0], False
        else:
            self._norms, self._own_norms = GradNormMonitor(log_every_n_steps=self.norms_every_n_steps), True
            self._norms.log_to_loggers = False
            self._norms.setup(trainer, pl_module, stage)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._own_norms:
            self._norms.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.check_on_train_epoch_end:
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.check_on_train_epoch_end and not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def _synced_value(self, trainer: L.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.strategy.reduce_boolean_decision(value is not None, all=True):
            if not self._warned_missing:
                available = ", ".join(sorted(trainer.callback_metrics)) or "none yet"
                rank_zero_warn(f"PlateauDetector: '{self.monitor}' is not logged (available: {available}); skipping")
                self._warned_missing = True
            return None
        if trainer.world_size == 1:
            return float(value)
        value = torch.as_tensor(value, dtype=torch.float32, device=pl_module_device(trainer))
        return float(trainer.strategy.reduce(value, reduce_op="mean"))

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = self._synced_value(trainer)
        if value is None:
            return
        self._check_steps.append(trainer.global_step)
        status = self.tracker.update(value)
        if status is Status.PLATEAU and self._is_good_enough(value):
            status = Status.WAITING
        fire = trainer.strategy.reduce_boolean_decision(status in (Status.PLATEAU, Status.DIVERGED), all=True)
        for check_listener in self._check_listeners:
            check_listener(trainer, pl_module, value)
        if not fire:
            return
        event = self._event(trainer, status, value)
        self.events.append(event)
        self._report(trainer, event)
        for listener in self._listeners:
            listener(trainer, pl_module, event)
        self.save_events(trainer)
        if status is Status.DIVERGED and self.stop_on_divergence:
            trainer.should_stop = True
            rank_zero_warn(
                f"Training diverged: {self.monitor} = {value} at epoch {trainer.current_epoch}; stopping. "
                "Lower the learning rate, or resume from the last finite checkpoint."
            )

    @property
    def diverged(self) -> bool:
        """Whether this fit has seen a divergence event."""
        return any(event["kind"] == "divergence" for event in self.events)

    def _is_good_enough(self, value: float) -> bool:
        if self.good_enough is None:
            return False
        return value <= self.good_enough if self.mode == "min" else value >= self.good_enough

    def _event(self, trainer: L.Trainer, status: Status, value: float) -> dict[str, Any]:
        event: dict[str, Any] = {
            "kind": "stall" if status is Status.PLATEAU else "divergence",
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "monitor": self.monitor,
            "value": value if math.isfinite(value) else str(value),
            "actions": [],
        }
        if status is Status.PLATEAU:
            start = self._check_steps[0]
            window = [p for p in self._norms.history if p.step >= start] or list(self._norms.history)[-1:]
            event["diagnosis"] = diagnose(window, **self.thresholds)
            if window:
                event["first_to_last"] = window[-1].first_to_last()
                event["grad_norms"] = dict(zip(window[-1].names, window[-1].norms, strict=True))
        return event

    def _report(self, trainer: L.Trainer, event: dict[str, Any]) -> None:
        what = event.get("diagnosis", "")
        rank_zero_info(
            f"PlateauDetector: {event['kind']} ({what}) at epoch {event['epoch']}, "
            f"{self.monitor} = {event['value']}".replace(" ()", "")
        )
        marker = {f"plateau/{event['kind']}": float(len(self.events))}
        for logger in trainer.loggers:
            logger.log_metrics(marker, step=event["step"])
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text("plateau/events", describe_event(event), event["step"])

    def save_events(self, trainer: L.Trainer) -> None:
        """Write all events to ``stall_events.json`` in the run directory (rank zero, atomically).

        Without a logger there is no run directory, and nothing is written."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir or not trainer.loggers:
            return
        path = Path(log_dir) / EVENTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.events, indent=2))
        os.replace(tmp, path)

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "events": self.events}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.events = list(state_dict["events"])


def pl_module_device(trainer: L.Trainer) -> torch.device:
    return trainer.strategy.root_device


def describe_event(event: dict[str, Any]) -> str:
    """One line of text for an event, as shown in TensorBoard and the end-of-run summary."""
    text = f"epoch {event['epoch']} (step {event['step']}): {event['kind']}"
    if "diagnosis" in event:
        text += f", diagnosis {event['diagnosis']}"
    text += f", {event['monitor']} = {event['value']:.4g}" if isinstance(event["value"], float) else ""
    if "first_to_last" in event:
        text += f", first/last grad {event['first_to_last']:.1e}"
    for action in event["actions"]:
        text += f"; action: {action['action']}"
    return text
