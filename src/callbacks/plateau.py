"""Detect that training has stalled, and say why (the rule itself is in :mod:`.plateau_rule`)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from .dashboard import log_event
from .events import EventKind, StallEvent, save_events
from .grad_flow import GradientPass, shared_pass
from .layer_monitor import mean_over_ranks
from .layer_stats import LayerStatistics, shared_statistics
from .loss_trend import StepWatch
from .names import EVENTS_FILE
from .plateau_rule import PlateauTracker, Status, diagnose
from .saturated import PinnedUnits
from .tracked import TrackedEarlyStopping
from .units import UnitRecorder

StallListener = Callable[[L.Trainer, L.LightningModule, StallEvent], None]
CheckListener = Callable[[L.Trainer, L.LightningModule, float], None]


class PlateauDetector(TrackedEarlyStopping):
    r"""Detects that a monitored metric has stopped improving, and diagnoses why.

    A check happens at each training epoch's end for a ``train/...`` metric or when validation runs
    every epoch (or never), otherwise after each validation run (``EarlyStopping``'s rule;
    ``check_on_train_epoch_end`` overrides it). For a training loss (``train...loss``, ``mode="min"``)
    checked at train epoch end, the loss each ``training_step`` returns is also checked every
    ``step_window // 10`` steps: a line through the losses of the last ``step_window`` optimizer steps
    (``global_step``: under gradient accumulation several batches a step, under manual optimization
    a step per ``optimizer.step()``) that is flat, in a window no better than an earlier one, is a
    stall (:class:`~.loss_trend.LossTrend`; through the means of the whole epochs in the window, where
    it holds 5 or more: :meth:`~.loss_trend.StepWatch.check`). The window
    is in steps, so a stall is reported within 500 steps (less than a Fashion-MNIST epoch at batch
    100) whatever the epoch's length, a stream under ``max_steps`` too; the defaults call no stall
    in the healthy Adam and SGD Fashion-MNIST runs measured. It spans at most ``2 * patience``
    epochs: in a full batch (a step an epoch) it sees, within twice the patience, the drift the
    epoch rule counts as improvement (the lab's XOR nearing its local minimum: 0.3525 -> 0.3506 in
    500 epochs). At an epoch's end the epoch rule goes first. Its event's value is the window's mean.

    ``patience`` counts epoch-end checks, as in ``EarlyStopping``. Nothing is checked outside
    ``fit``, in the sanity check, or under ``fast_dev_run``. It is an ``EarlyStopping`` with its own
    rule so that Lightning runs its epoch-end check after the LightningModule's own (a metric logged
    in ``on_train_epoch_end`` is checked in that epoch); its attributes
    (:class:`~.tracked.TrackedEarlyStopping`), ``stopped_epoch`` and ``stopping_reason`` tell the
    truth about its rule, and a real ``EarlyStopping`` beside it stays
    ``trainer.early_stopping_callback`` (the detector moves itself after it).

    On a stall it records a :class:`~.events.StallEvent` with a diagnosis (:func:`~.plateau_rule.diagnose`)
    from the per-layer gradient norms over the patience window (the trainer's one
    :class:`~.grad_flow.GradientPass`, read every ``norms_every_n_steps`` steps, each optimizer at its
    own steps), the layers' activation statistics (the trainer's one
    :class:`~.layer_stats.LayerStatistics`) and, in a ReLU MLP, the units that did nothing this epoch;
    logs a ``plateau/stall`` marker on the loss curve and a text entry; and writes
    ``stall_events.json`` in the run directory (the events are in its state, so a resumed run knows
    them). A NaN or infinite value, or one worse than ``divergence_threshold``, is a ``divergence``
    event, and stops training when ``stop_on_divergence`` is set. Under DDP the values are averaged
    over the processes and the decision reduced, so every rank decides the same; a rank that misses
    the metric makes every rank skip that check.

    Other callbacks (:class:`~.escape.PlateauEscape`) subscribe with :meth:`add_listener`; a listener
    gets each :class:`~.events.StallEvent`; one that undoes a divergence (rolls back to a finite
    state) sets the event's ``recovered`` to true, and the run then goes on.

    Args:
        monitor: The metric to watch.
        mode: ``min`` if lower is better, ``max`` if higher is.
        patience: Checks without improvement that make a stall.
        min_delta: Smallest change that counts as an improvement (see ``threshold_mode``).
        threshold_mode: ``rel``: improve on the best by ``min_delta * |best|``; ``abs``: by ``min_delta``.
        cooldown: Checks after a stall before waiting starts again (time for a remedy to act).
        warmup: Checks at the start that can never end in a stall.
        check_on_train_epoch_end: Check at train epoch end (``True``) or after validation (``False``);
            ``None``: at train epoch end for a ``train/`` metric or when validation runs every
            epoch (``EarlyStopping``'s rule), otherwise after validation.
        vanishing_ratio: First-to-last layer gradient ratio below which the diagnosis is ``vanishing``.
        flat_norm: Gradient norm below which every layer must be for ``flat``.
        flat_spread: Largest-to-smallest layer ratio that still counts as an even (``flat``) profile.
        norms_every_n_steps: Steps between gradient readings (``None``: ``log_every_n_steps``).
        stop_on_divergence: Stop training on a divergence.
        divergence_threshold: A value worse than this (above it for ``min``) is a divergence too, as
            in ``EarlyStopping``: a loss can blow up to 1e6 and stay finite. ``None``: only NaN/inf.
        good_enough: A plateau at a value at least this good is convergence: no event.
        same_kink: Cosine between two ReLU units' ``[w, b]`` rows above which they are redundant.
        step_window: Training steps a step check looks back over; ``None``: checks at epoch end only.
        step_min_delta: Smallest drop over ``step_window`` steps, a share of the loss, that counts.

    Raises:
        ValueError: On a bad argument, naming it.

    Example: ``Trainer(callbacks=[GradNormMonitor(), PlateauDetector(monitor="train/loss", patience=50)])``
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
        same_kink: float = 0.999,
        step_window: int | None = 500,
        step_min_delta: float = 0.01,
    ) -> None:
        try:
            self.tracker = PlateauTracker(
                mode, patience, min_delta, threshold_mode, cooldown, warmup, divergence_threshold
            )
        except ValueError as err:
            raise ValueError(f"PlateauDetector: {err}") from None
        # EarlyStopping's own rule is never run (its hooks are overridden below); what its __init__
        # sets is routed to the tracker (the properties below), so that it reads true.
        super().__init__(
            monitor=monitor, mode=mode, patience=patience, min_delta=min_delta,
            divergence_threshold=divergence_threshold, check_on_train_epoch_end=check_on_train_epoch_end,
        )  # fmt: skip
        for name, value in (("vanishing_ratio", vanishing_ratio), ("flat_norm", flat_norm)):
            if not 0 < value < 1:
                raise ValueError(f"PlateauDetector: {name} must be in (0, 1), got {value}")
        if not 0 < same_kink <= 1:
            raise ValueError(f"PlateauDetector: same_kink must be in (0, 1], got {same_kink}")
        try:
            self.steps = StepWatch(step_window, step_min_delta) if step_window is not None else None
        except ValueError as err:
            raise ValueError(f"PlateauDetector: {err}") from None
        if flat_spread < 1:
            raise ValueError(f"PlateauDetector: flat_spread must be >= 1, got {flat_spread}")
        if norms_every_n_steps is not None and norms_every_n_steps < 1:
            raise ValueError(f"PlateauDetector: norms_every_n_steps must be >= 1, got {norms_every_n_steps}")
        self._check_on_train_epoch_end_arg = check_on_train_epoch_end
        self.check_on_train_epoch_end = check_on_train_epoch_end  # None: decided in setup
        self.thresholds = {"vanishing_ratio": vanishing_ratio, "flat_norm": flat_norm, "flat_spread": flat_spread}
        self.norms_every_n_steps = norms_every_n_steps
        self.stop_on_divergence = stop_on_divergence
        self.good_enough = good_enough
        self.events: list[StallEvent] = []
        self.same_kink = same_kink
        self.gradients = GradientPass()  # until setup shares the trainer's
        self.layer_stats = LayerStatistics()  # likewise
        self.units = UnitRecorder()
        self.pinned = PinnedUnits()
        self._check_steps: deque[int] = deque(maxlen=patience + 1)
        self._step_due = False  # a step check due at the epoch's last batch, made after the epoch rule
        self._listeners: list[StallListener] = []
        self._check_listeners: list[CheckListener] = []
        self._warned_missing = False

    @property
    @override
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

    def restart(self, step: int) -> None:
        """A remedy changed the model (new units): judge stalls from here, not against the best so far."""
        self.tracker.best = math.inf if self.mode == "min" else -math.inf
        self.tracker.wait = 0
        if self.steps is not None:
            self.steps.rule.restart(step, forget=True)

    @property
    def last_stall(self) -> StallEvent:
        """The last stall event of this fit."""
        return next(e for e in reversed(self.events) if e.kind is EventKind.STALL)

    @property
    def diverged(self) -> bool:
        """Whether this fit has seen a divergence event that no rollback undid."""
        return any(event.kind is EventKind.DIVERGENCE and not event.recovered for event in self.events)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._check_on_train_epoch_end_arg is None:
            every_epoch = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
            self.check_on_train_epoch_end = self.monitor.startswith("train") or every_epoch
        self.gradients = shared_pass(trainer)
        self.layer_stats = shared_statistics(trainer)
        # A real EarlyStopping stays trainer.early_stopping_callback (the first EarlyStopping listed).
        # A new list: Lightning is iterating over the old one to call this hook, and an element moved
        # in it would make the loop skip the next callback's setup.
        callbacks = list(trainer.callbacks)
        real = [
            i for i, cb in enumerate(callbacks) if isinstance(cb, EarlyStopping) and not isinstance(cb, PlateauDetector)
        ]
        if real and callbacks.index(self) < real[-1]:
            callbacks.remove(self)
            callbacks.insert(real[-1], self)
            trainer.callbacks = callbacks

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.steps is not None:
            self.steps.fit_within(2 * self.patience, trainer)
        self.units.bind(pl_module)
        self.pinned.bind(pl_module)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.units.reset()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.units.close()
        self.pinned.close()

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        every = self.norms_every_n_steps or trainer.log_every_n_steps
        reading = self.gradients.read(pl_module, trainer.optimizers, optimizer, trainer.global_step, every)
        if self.layer_stats.step == trainer.global_step:
            self.layer_stats.before_step(pl_module, reading)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % (self.norms_every_n_steps or trainer.log_every_n_steps) == 0:
            self.layer_stats.arm(pl_module, trainer.global_step)
            self.pinned.arm()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.layer_stats.step is not None:
            self.layer_stats.finish(pl_module, mean_over_ranks(trainer))
        due = self.watches_steps and self.steps.add(outputs, trainer)
        self._step_due = due and batch_idx + 1 == trainer.num_training_batches  # after the epoch rule, at its end
        if due and not self._step_due:
            self._step_check(trainer, pl_module)

    def _step_check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip_check(trainer):
            return
        status, value, since = self.steps.check(trainer, self.tracker.diverged)
        events = len(self.events)
        self._decide(trainer, pl_module, status, value, since)
        if len(self.events) > events:
            self.tracker.wait = 0  # one event per stall, whichever rule saw it first

    @property
    def watches_steps(self) -> bool:
        """Whether the step rule applies: a training loss, checked at train epoch end."""
        watched = self.monitor.startswith("train") and "loss" in self.monitor.rsplit("/", 1)[-1]
        return watched and self.steps is not None and self.mode == "min" and bool(self.check_on_train_epoch_end)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        events = len(self.events)
        if self.check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._check(trainer, pl_module)
        if self._step_due and len(self.events) == events:  # the step rule, where the epoch rule saw nothing
            self._step_check(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.check_on_train_epoch_end and not self._should_skip_check(trainer):
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
        value = torch.as_tensor(value, dtype=torch.float32, device=trainer.strategy.root_device)
        return float(trainer.strategy.reduce(value, reduce_op="mean"))

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = self._synced_value(trainer)
        if value is None:
            return
        self._check_steps.append(trainer.global_step)
        self._decide(trainer, pl_module, self.tracker.update(value), value, since=self._check_steps[0])

    def _decide(
        self, trainer: L.Trainer, pl_module: L.LightningModule, status: Status, value: float, since: int
    ) -> None:
        """What a check concluded (``status`` for ``value``), with the steps from ``since`` for the diagnosis."""
        if status is Status.PLATEAU and self._is_good_enough(value):
            status = Status.WAITING
        fire = trainer.strategy.reduce_boolean_decision(status in (Status.PLATEAU, Status.DIVERGED), all=True)
        for check_listener in self._check_listeners:
            check_listener(trainer, pl_module, value)
        if not fire:
            return
        if self.steps is not None:
            self.steps.rule.restart(trainer.global_step)
        event = self._event(trainer, status, value, since)
        self.events.append(event)
        self._report(trainer, event)
        for listener in self._listeners:
            listener(trainer, pl_module, event)
        self.save_events(trainer)
        if status is Status.DIVERGED and self.stop_on_divergence and not event.recovered:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            finite = math.isfinite(value)
            self.stopping_reason = (
                EarlyStoppingReason.DIVERGENCE_THRESHOLD if finite else EarlyStoppingReason.NON_FINITE_METRIC
            )
            self.stopping_reason_message = f"{self.monitor} = {value} at epoch {trainer.current_epoch}: diverged"
            rank_zero_warn(
                f"Training diverged: {self.monitor} = {value} at epoch {trainer.current_epoch}; stopping. "
                "Lower the learning rate, or resume from the last finite checkpoint."
            )

    def _is_good_enough(self, value: float) -> bool:
        if self.good_enough is None:
            return False
        return value <= self.good_enough if self.mode == "min" else value >= self.good_enough

    def _event(self, trainer: L.Trainer, status: Status, value: float, since: int) -> StallEvent:
        event = StallEvent(
            EventKind.STALL if status is Status.PLATEAU else EventKind.DIVERGENCE,
            epoch=trainer.current_epoch, step=trainer.global_step, monitor=self.monitor, value=value,
        )  # fmt: skip
        if status is Status.PLATEAU:
            window = self.gradients.since(since)
            units = self.units.idle(trainer, self.same_kink)
            for name, pinned in self.pinned.find(reduce := mean_over_ranks(trainer)).items():
                units.setdefault(name, {})["saturated"] = pinned
            event.units, stats = units or None, self.layer_stats.latest
            event.layers = {n: {k: v for k, v in asdict(s).items() if v is not None} for n, s in stats.items()} or None
            every = bool(self.pinned.find(reduce, share=1.0))  # pinned on every input: a bias, not a rare feature
            event.diagnosis = diagnose(window, **self.thresholds, units=units, layers=stats, pinned_everywhere=every)
            if window:
                event.first_to_last = window[-1].first_to_last()
                event.grad_norms = dict(zip(window[-1].names, window[-1].norms, strict=True))
        return event

    def _report(self, trainer: L.Trainer, event: StallEvent) -> None:
        what = f" ({event.diagnosis})" if event.diagnosis else ""
        rank_zero_info(
            f"PlateauDetector: {event.kind.value}{what} at epoch {event.epoch}, {self.monitor} = {event.value}"
        )
        log_event(trainer, event, self.tracker.divergence_threshold)

    def save_events(self, trainer: L.Trainer) -> None:
        """Write all events to ``stall_events.json`` in the run directory (rank zero, atomically).

        Without a logger there is no run directory, and nothing is written."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and log_dir and trainer.loggers:  # every detector's events, by step
            events = [e for cb in trainer.callbacks if isinstance(cb, PlateauDetector) for e in cb.events]
            save_events(sorted(events, key=lambda e: e.step), Path(log_dir) / EVENTS_FILE)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "events": [event.to_dict() for event in self.events],
            "stopped_epoch": self.stopped_epoch,
            "stopping_reason": self.stopping_reason.value,
            "steps": self.steps.state_dict() if self.steps is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.events = [StallEvent.from_dict(event) for event in state_dict["events"]]
        self.stopped_epoch = state_dict.get("stopped_epoch", 0)
        self.stopping_reason = EarlyStoppingReason(state_dict.get("stopping_reason", 0))
        if self.steps is not None and state_dict.get("steps") is not None:
            self.steps.load_state_dict(state_dict["steps"])
