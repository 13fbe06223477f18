"""Get a stalled run moving: switch SGD to momentum, or raise the learning rate, one step per stall."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from . import escape_policy as policies
from . import escape_snapshot as snapshots
from .dashboard import log_action
from .escape_actions import EscapeAction, LayerwiseSteps, apply_to_trainer, confirm_settings, settings_of
from .escape_state import CheckpointedWalk
from .escape_units import replace_stall_units
from .events import OUT_OF_STALL, Action, EventKind, StallEvent, moved_past
from .grad_flow import parameter_layers
from .plateau import PlateauDetector
from .tracked import stops_at_non_finite

SPENT = "none: every escape action is spent"


class PlateauEscape(CheckpointedWalk, Callback):
    r"""Acts on the stalls a :class:`~src.callbacks.PlateauDetector` reports, with the remedy for each diagnosis.

    ``actions`` maps a diagnosis to its escalation list; each stall gets the next action of its
    diagnosis's list, or of ``any`` once that list is spent or where there is none, unless the action
    that got the run out of its last stall (or brought a gain there) can apply again. The default
    (:data:`.escape_policy.DEFAULT_ACTIONS`): layer-wise steps for ``vanishing``; the units it names
    re-placed for a unit diagnosis (ReDo's rule for pinned sigmoid/tanh units, :mod:`.saturated`); for
    ``flat`` and ``unclear``, momentum 0.9 (the source study's remedy), then the weakest units re-placed.

    Each action is on probation until the next stall: there its settings are withdrawn if the best monitored value
    since is not ``probation`` better than the stall it answered (its floor: the best value before it, if lower; a
    repeating one gets ``PATIENT_REPEATS`` probations), and it is rolled back, weights too, if the run diverged,
    stalls at twice that value, or above both it and the first stall the escape answered (where the run without the
    escape would sit; a re-placement: above it); the next action is then tried, judged from where the run went back
    to. No action is taken that the fit would end before judging (:func:`.escape_policy.too_late`). An action
    withdrawn or rolled back is passed over, in every list, until one brings a gain, and so is one whose settings
    hold already (momentum 0.9 where it is 0.9); once all else is spent, a re-placement that did harm gets new
    units, ``PATIENT_REPEATS`` times in all. Once every action is spent the run says so once and goes on with the
    optimizer's own settings, layer-wise steps off (kicks whose undo did harm stay): nothing the policy set got it
    out, and it must not end worse than without it. Where it then stalls above the value it was found at (by
    ``probation``), there or where it is too late to judge another action, it goes back to where the escape found
    it, weights and all (``_back_to_origin``). Each action is logged (``optim/lr``, ``optim/momentum``, text)
    and put in ``stall_events.json`` with each lr before and after. A divergence once the run is out of a stall, or
    a stall back at the one it was out of, takes it back to where it was out, with the optimizer's own settings
    (kicks whose undo did harm: with the settings there, steps halved) and, each time again, half the lr
    (:func:`.escape_snapshot.back_to_safe`); a run never out of a stall is left to diverge. All this state is
    checkpointed, so a resume is exact.

    Args:
        actions: A mapping from diagnosis (or ``any``) to a list of actions, or a plain list (the same as ``{any:
            [...]}``), as YAML such as ``{vanishing: [{trust_ratio: 0.01}], any: [{momentum: 0.9}, {lr_factor: 10,
            max_lr: 1.0}]}``; see :class:`EscapeAction`.
        on_exhausted: What to do on a stall that has no action left: ``continue``, or ``stop`` (said why).
        restore_lr_below: lr raises, eps and layer-wise steps are a kick: once the monitored value is below this
            share of its value at the stall of the last kick (above its inverse for ``max``), they are undone
            (momentum stays); ``null`` keeps them. Where the undo blows the run up, or takes it back to that stall,
            it is rolled back and they stay, layer-wise steps ``KEPT_STEPS`` times as large; where the run then
            crawls (``CRAWL``), they come back, to be undone again once the loss has halved.
        rollback_on_divergence: Undo an action after which the run diverges or stalls at twice the loss.
        probation: The least gain (a share of the value at its stall) an action must bring before the next stall
            to be kept; ``null``: every action is kept, and they add up.

    Raises:
        ValueError: At construction for a malformed action; at fit start when an action cannot apply to the
            optimizer (momentum on Adam), or when the Trainer has no ``PlateauDetector``.

    Example: ``callbacks = [GradNormMonitor(), PlateauDetector(patience=100), PlateauEscape()]``
    """

    def __init__(
        self,
        actions: list[EscapeAction] | dict[str, list[EscapeAction]] | None = None,
        on_exhausted: Literal["continue", "stop"] = "continue",
        restore_lr_below: float | None = 0.5,
        rollback_on_divergence: bool = True,
        probation: float | None = 0.01,
    ) -> None:
        super().__init__()
        if on_exhausted not in ("continue", "stop"):
            raise ValueError(f"PlateauEscape: on_exhausted must be 'continue' or 'stop', got {on_exhausted!r}")
        try:
            self.actions = policies.parse_policy(policies.DEFAULT_ACTIONS if actions is None else actions)
        except ValueError as err:
            raise ValueError(f"PlateauEscape: {err}") from None
        self._configured = {key: list(listed) for key, listed in self.actions.items()}
        self._default_policy = actions is None
        for name, value in (("restore_lr_below", restore_lr_below), ("probation", probation)):
            if value is not None and not 0 < value < 1:
                raise ValueError(f"PlateauEscape: {name} must be in (0, 1) or null, got {value}")
        self.on_exhausted, self.restore_lr_below, self.probation = on_exhausted, restore_lr_below, probation
        self.spent_by: dict[str, int] = {}
        self.failed: list[str] = []  # lists whose action was rolled back: not tried again
        self.withdrawn: list[str] = []  # actions that brought nothing since the last that did: passed over
        self.worked: tuple[str, str] | None = None  # the list and action that got the run out: first next time
        self.applied, self.said_spent = 0, False
        self.history: list[Action] = []
        self.lr_scale = 1.0  # product of the lr raises in force
        self.trust_ratio: float | None = None  # layer-wise steps in force
        self.raised_at: float | None = None  # monitored value at the stall that caused the last kick
        self.raised_step: int | None = None  # and the step it was taken at
        self.keep_kicks = False  # undoing them blew the run up once: they stay
        self.redraws: dict[str, int] = {}  # per list: its re-placements that did harm
        self.rollback_on_divergence = rollback_on_divergence
        self.fruitless: dict[str, int] = {}  # per list: probations in a row its repeating action had no gain
        self._snapshot: dict[str, Any] | None = None  # the state before the last action, in memory
        # the state where the run was last out of a stall; the same taken at the last check (the next judges it)
        self._safe: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._own: list[list[dict[str, Any]]] | None = None  # the optimizers' settings before any action
        self._first: float | None = None  # the monitored value at the first stall an action answered
        self._origin: dict[str, Any] | None = None  # the state before the first action: where it found the run
        self._detector: PlateauDetector | None = None
        self._steps = LayerwiseSteps()
        self._unconfirmed: list[Action] = []  # actions whose settings the next optimizer step confirms

    spent = property(lambda self: self.applied, doc="How many actions this fit has applied.")

    @property
    @override
    def state_key(self) -> str:
        # asked for around every hook: the configured actions (a resume restores before fit start adapts them)
        if getattr(self, "_state_key", None) is None:
            described = {key: [a.describe() for a in listed] for key, listed in self._configured.items()}
            only_any = list(described) == ["any"]
            self._state_key = self._generate_state_key(actions=described["any"] if only_any else described)
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
        for stop in stops_at_non_finite(trainer.callbacks) if self.rollback_on_divergence and stage == "fit" else []:
            rank_zero_warn(f"PlateauEscape: EarlyStopping(monitor={stop.monitor!r}) would end the fit at a NaN that "
                           "PlateauEscape rolls back; give it check_finite=False")  # fmt: skip

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A user's policy must apply to the optimizer as it is (one line otherwise); the default serves any: the
        parts it has no setting for are left out (momentum on Adam), layer-wise steps act on the step it takes."""
        self.actions = policies.policy_for(self._configured, trainer.optimizers, adapt=self._default_policy)
        self._steps.layers = parameter_layers(pl_module)
        if [str(a) for a in self._configured.values()] != [str(a) for a in self.actions.values()]:
            names = ", ".join(sorted({type(o).__name__ for o in trainer.optimizers}))
            rank_zero_info(f"PlateauEscape: the default policy, adapted to {names} (escape_actions.adapted)")

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # the settings the step uses, now that schedulers and other callbacks have had their turn
        if self._unconfirmed and confirm_settings(self._unconfirmed, trainer.optimizers[0]):
            self._detector.save_events(trainer)
        self._unconfirmed = []
        if self.trust_ratio is not None:
            clipped = pl_module.automatic_optimization and bool(trainer.gradient_clip_val)  # after this hook
            self._steps.before_step(optimizer, self.trust_ratio, clipped)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._steps.after_step(self.trust_ratio or 0.0)

    def next_action(self, diagnosis: str | None) -> tuple[str, EscapeAction] | None:
        """The action the next stall with this diagnosis gets, and its list (see ``next_in_policy``)."""
        chosen = policies.next_in_policy(
            self.actions, self.spent_by, self.failed, diagnosis, self.withdrawn, self.worked
        )
        return None if chosen is None else chosen[:2]

    def on_stall(self, trainer: L.Trainer, pl_module: L.LightningModule, event: StallEvent) -> None:
        """Apply the next action for a stall event (called by the PlateauDetector)."""
        if event.kind is EventKind.DIVERGENCE and self._snapshot is not None:
            self._roll_back(trainer, pl_module, event, why="diverged")
            return
        own = snapshots.group_settings(trainer) == self._own
        in_force = self.lr_scale != 1.0 or self.trust_ratio is not None or not own
        if event.kind is EventKind.DIVERGENCE and self._safe is not None:  # on a path the escape set it on
            event.recovered = True
            self._back_to_safe(trainer, pl_module, event, "diverged", in_force)
            return
        if event.kind is EventKind.DIVERGENCE and self.lr_scale != 1.0:
            last = next(r for r in reversed(self.history) if r.lr_raise)  # never silently: the raise before it
            note = f"none: diverged after '{last.action}' at epoch {last.epoch} (lr {last.lr[0]:g})"
            event.actions.append(Action(note, event.epoch, event.step))
        if event.kind is not EventKind.STALL:
            return
        if self._snapshot is None and policies.relapsed(self._safe, event.value, self.probation, self._detector.mode):
            why = f"back at the stall left at {self._safe['left']:.4g}"  # no action on probation: as above
            self._back_to_safe(trainer, pl_module, event, why, in_force)
            return
        why, harmed = self._failed_why(event.value)
        floor = policies.plateau_floor(self._snapshot, event.value, harmed, self._detector.mode)
        momenta = settings_of(trainer.optimizers[0])["momentum"]  # what built the momentum buffers
        value = event.value  # what the next action is judged from: where a harmful one is rolled back to
        if why is not None:
            undo, value = self._snapshot["list"] is None, self._snapshot["value"] if harmed else value
            self._roll_back(trainer, pl_module, event, why=why, weights=harmed)
            if undo:  # back to where the kicks were getting the run out: nothing more to do
                return
        avoid = self.withdrawn + policies.idle_actions(self.actions, trainer.optimizers)  # in vain, or changing nothing
        worked, self.worked = self.worked, None
        chosen = policies.next_in_policy(self.actions, self.spent_by, self.failed, event.diagnosis, avoid, worked)
        if chosen is None:  # last, a re-placement that did harm, with new units: PATIENT_REPEATS times in all
            failed = [key for key in self.failed if not 0 < self.redraws.get(key, 0) < policies.PATIENT_REPEATS]
            chosen = policies.next_in_policy(self.actions, self.spent_by, failed, event.diagnosis, avoid)
        if chosen is None:
            if self.on_exhausted == "stop":
                trainer.should_stop = True
                event.actions.append(Action("stop: every escape action is spent", event.epoch, event.step))
                rank_zero_info("PlateauEscape: still stalled after every action; stopping")
            elif not self.said_spent:  # once: later stalls are recorded without an action
                self.said_spent, lrs = True, settings_of(trainer.optimizers[0])["lr"]
                # nothing got it out: it goes on as without the escape (from where it found the run, if that was
                # better), but for kicks whose undo did harm
                back = self._back_to_origin(trainer, pl_module, event, value, SPENT)
                if (
                    not back
                    and not self.keep_kicks
                    and (snapshots.put_own(trainer, self._own, self.lr_scale) or self.trust_ratio)
                ):
                    self.lr_scale, self.trust_ratio = 1.0, None
                    self.raised_at = self.worked = self._snapshot = None  # nothing on probation, nothing to repeat
                    self._record(trainer, event, f"{SPENT}; the optimizer's own settings back", lr_from=lrs)
                elif not back:
                    event.actions.append(Action(SPENT, event.epoch, event.step))
                rank_zero_info("PlateauEscape: still stalled after every action; no more actions in this fit")
            return
        if late := policies.too_late(trainer, self._detector):  # no action the fit would end before judging
            if not self._back_to_origin(trainer, pl_module, event, value, late):
                event.actions.append(Action(late, event.epoch, event.step))
            return
        key, action, position = chosen
        self.spent_by[key], self.applied = position, self.applied + 1
        self._own = snapshots.group_settings(trainer) if self._own is None else self._own
        self._first = event.value if self._first is None else self._first
        if self.rollback_on_divergence or self.probation is not None:
            self._snapshot = self._snapshot_now(trainer, pl_module, value, action.describe(), key) | {"floor": floor}
            self._origin = self._snapshot if self._origin is None and self.applied == 1 else self._origin
        lrs_before = settings_of(trainer.optimizers[0])["lr"]
        what = action.describe()
        if action.sets_optimizer:
            # a momentum withdrawn for bringing nothing and set again keeps the velocity it built
            same = why is not None and not harmed and all(m == action.momentum for m in momenta)
            apply_to_trainer(trainer, action, keep_buffers=same)
        lr_before, lr_after = lrs_before[0], float(trainer.optimizers[0].param_groups[0]["lr"])
        if action.lr_factor is not None and lr_before > 0:
            self.lr_scale *= lr_after / lr_before
            self.raised_at, self.raised_step = value, trainer.global_step
        if action.trust_ratio is not None or action.eps is not None:  # kicks: undone once out of the stall
            self.trust_ratio = self.trust_ratio if action.trust_ratio is None else action.trust_ratio
            self.raised_at, self.raised_step = value, trainer.global_step
        if self.raised_at is not None and self.restore_lr_below is not None:
            event.out_fraction = self.restore_lr_below  # the progress bar closes the stall when the kicks end
        if action.replace_units or action.recycle:
            # harmed: rolled back, weights too, so the stall's units were found on weights now gone
            replaced = replace_stall_units(trainer, pl_module, self._detector, event.units, action.recycle, harmed)
            what += replaced
            self._detector.restart(trainer.global_step)  # the loss moves from the new units' start
            if self._snapshot is not None:  # harm is judged from the first check after it; units found: it may repeat
                self._snapshot |= {"ref": None, "replaced": replaced != ": none found"}
            if action.trust_ratio is None and self.trust_ratio is not None:
                # new units start from outgoing weights of ~0: steps scaled to |W| would not move them
                self.trust_ratio = None
                what += "; layer-wise steps off"
        self._record(trainer, event, what, lr_raise=action.lr_factor is not None, lr_from=lrs_before)

    def _snapshot_now(
        self, trainer: L.Trainer, pl_module: L.LightningModule, value: float, action: str, key: str | None
    ) -> dict[str, Any]:
        """The state to go back to if ``action`` (from list ``key``; None: undoing the kicks) fails."""
        kicks = (self.lr_scale, self.trust_ratio, self.raised_at)
        info = {"epoch": trainer.current_epoch, "value": value, "best": value, "action": action, "list": key}
        info |= {"step": trainer.global_step, "raised_step": self.raised_step}
        info |= {"first": value if self._first is None else self._first}  # where the escape found the run
        return snapshots.take_snapshot(trainer, pl_module, **info, kicks=kicks)

    def _roll_back(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: StallEvent, why: str, weights: bool = True
    ) -> None:
        """Undo the action on probation: weights, optimizer state and kicks (harm), or settings and kicks
        (``weights=False``: no gain). A divergence event is marked ``recovered``; a repeating action is not
        repeated (its list is ``failed``); undone kicks that did harm come back and stay (``keep_kicks``)."""
        snapshot, self._snapshot = self._snapshot, None
        if not snapshot.get("replaced"):  # a re-placement that found units may repeat: new units each time
            self.withdrawn.append(snapshot["action"])
        lrs_before = snapshots.restore_snapshot(trainer, pl_module, snapshot, weights=weights)
        self.lr_scale, self.trust_ratio, self.raised_at = snapshot["kicks"]
        self.raised_step = snapshot.get("raised_step", self.raised_step)
        if event.kind is EventKind.DIVERGENCE and self._safe is None:  # never out of a stall yet: come back here
            self._safe = snapshot
        key = snapshot["list"]
        if key is None:  # the kicks were undone: keep them from now on, the steps larger
            self.keep_kicks = True
            self.trust_ratio = None if self.trust_ratio is None else self.trust_ratio * policies.KEPT_STEPS
        elif self.spent_by.get(key, 0) >= len(self.actions.get(key, ())):
            # not again; a re-placement that found units: again, new ones (one that did harm: once all else is spent)
            if weights and snapshot.get("replaced"):
                self.redraws[key] = self.redraws.get(key, 0) + 1
            self.failed += [key] if key not in self.failed and (weights or not snapshot.get("replaced")) else []
        event.recovered = event.recovered or event.kind is EventKind.DIVERGENCE
        what = f"{why}: rolled back to epoch {snapshot['epoch']}, before '{snapshot['action']}'"
        if not weights:
            what = f"{why}: '{snapshot['action']}' withdrawn (settings of epoch {snapshot['epoch']})"
        if key is None:  # with the steps' new size
            steps = "" if self.trust_ratio is None else f", steps of {self.trust_ratio:g} x |W|"
            what += f"; they stay in force{steps}"
        self._record(trainer, event, what, trainer.current_epoch, trainer.global_step, lr_from=lrs_before)

    def on_check(self, trainer: L.Trainer, pl_module: L.LightningModule, value: float) -> None:
        """Undo the kicks (lr raises, layer-wise steps) once ``value`` says the run is out of the stall;
        roll the undo back (they stay) where ``value`` is back at the stall they answered."""
        mode, sound = self._detector.mode, math.isfinite(value) and not self._detector.tracker.diverged(value)
        if self._pending is not None:  # the first check of its weights (a step can blow them up): kept if sound
            self._safe, self._pending = self._pending if sound else self._safe, None
        if self._snapshot is not None:
            snapshots.note_check(self._snapshot, value, mode, policies.RECENT_CHECKS)
        at = (self._snapshot or {}).get("stall")  # kicks undone: back at the stall they answered, they come back
        back = at is not None and not moved_past(value, at, 1 - (self.probation or 0.01), mode)
        if back and sound:  # not a divergence
            why = f"{self._detector.monitor} back at {value:.4g}"
            self._roll_back(trainer, pl_module, self._detector.last_stall, why=why)
            self._detector.save_events(trainer)
            return
        if at is not None and (drops := policies.crawling(self._snapshot, trainer.global_step, mode)):
            self._kicks_back(trainer, pl_module, value, drops)
            return
        if self._snapshot is not None and moved_past(value, self._snapshot["value"], OUT_OF_STALL, mode):
            left, key = self._snapshot["value"], self._snapshot["list"]
            self.worked = self.worked if key is None else (key, self._snapshot["action"])
            self._snapshot, self.withdrawn = None, []  # out of the stall: the point to come back to
            if self.rollback_on_divergence:
                self._pending = self._snapshot_now(trainer, pl_module, value, "", None) | {"left": left}
        if self.restore_lr_below is None or self.raised_at is None or self.keep_kicks:
            return
        if not moved_past(value, self.raised_at, self.restore_lr_below, mode):  # not out of the stall yet
            return
        undone = ["lr restored"] if self.lr_scale != 1.0 else []
        undone += ["layer-wise steps off"] if self.trust_ratio is not None else []
        undone += ["eps back"] if snapshots.eps_kicked(trainer, self._own) else []
        if not undone:  # a raise that changed nothing (the lr was at its cap already): nothing to undo
            self.raised_at = None
            return
        if self.rollback_on_divergence or self.probation is not None:  # undoing a kick can blow the run up too
            self._snapshot = self._snapshot_now(trainer, pl_module, value, ", ".join(undone), None)
            self._snapshot["stall"] = self.raised_at  # with its step and the kick's: crawling reads them
        lrs_before = settings_of(trainer.optimizers[0])["lr"]
        if self.lr_scale != 1.0:
            apply_to_trainer(trainer, EscapeAction(lr_factor=1 / self.lr_scale))
        snapshots.put_eps_back(trainer, self._own)
        self.lr_scale, self.trust_ratio, self.raised_at = 1.0, None, None
        event = self._detector.last_stall
        what = f"{', '.join(undone)} (out of the stall: {value:.4g} vs {event.value:.4g})"
        self._record(trainer, event, what, epoch=trainer.current_epoch, step=trainer.global_step, lr_from=lrs_before)
        self._detector.save_events(trainer)

    def _kicks_back(self, trainer: L.Trainer, module: L.LightningModule, at: float, drops: tuple[float, float]) -> None:
        """The kicks undone come back (settings, not weights), to be undone again once out of this stall."""
        (kicked, since), snapshot, self._snapshot = drops, self._snapshot, None
        lrs_before = snapshots.restore_snapshot(trainer, module, snapshot, weights=False)
        event, epoch, step = self._detector.last_stall, trainer.current_epoch, trainer.global_step
        self.lr_scale, self.trust_ratio, self.raised_at, self.raised_step = *snapshot["kicks"][:2], at, step
        span = snapshot["step"] - snapshot["raised_step"]
        what = f"{self._detector.monitor} fell {since:.3g} in {span} steps without the kicks"
        what += f" ({kicked:.3g} with them): '{snapshot['action']}' undone"
        self._record(trainer, event, what, epoch, step, lr_from=lrs_before)
        self._detector.save_events(trainer)

    def _back_to_safe(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: StallEvent, why: str, in_force: bool
    ) -> None:
        """Back to the safe point with the optimizers' own settings (kicks whose undo did harm: the point's
        settings, those kicks kept, and halved); x0.5 at once where those held already."""
        self._safe["tries"] = self._safe.get("tries") or int(not in_force or self.keep_kicks)
        own = None if self.keep_kicks else self._own
        lrs_before, what = snapshots.back_to_safe(trainer, pl_module, self._safe, own, why)
        self._safe = self._safe if self._safe["tries"] < snapshots.SAFE_RETRIES else None  # again: lr / 2
        self.lr_scale, self.raised_at = 1.0, None  # kept steps halved too: they do not follow the lr
        self.trust_ratio = self.trust_ratio / 2 if self.keep_kicks and self.trust_ratio else None
        what += f", steps of {self.trust_ratio:g} x |W|" if self.trust_ratio else ""
        self._record(trainer, event, what, lr_from=lrs_before)

    def _back_to_origin(
        self, trainer: L.Trainer, pl_module: L.LightningModule, event: StallEvent, value: float, why: str
    ) -> bool:
        """Where the escape stops acting (``why``: its actions spent, or too late to judge one) with the run
        stalled worse than where it found it (by ``probation``), back there: the weights, optimizer states and
        settings before its first action. The run then goes on as it would have without the escape, from
        there (the stall zoo on mini-batches, AdamW: 7 of 8 runs ended 1.4-4% above the run without it)."""
        origin, mode = self._origin, self._detector.mode
        if origin is None or not moved_past(origin["value"], value, 1 - (self.probation or 0.01), mode):
            return False
        self._origin = self._snapshot = self._safe = self._pending = None
        lrs_before = snapshots.restore_snapshot(trainer, pl_module, origin)
        self.lr_scale, self.trust_ratio, self.raised_at = origin["kicks"]
        self.said_spent = True  # nothing more: the run is where it would be without the escape
        what = f"{why}; back to epoch {origin['epoch']}, before the first action, where the escape found the run"
        what += f" ({self._detector.monitor} {origin['value']:.4g}, now {value:.4g})"
        self._record(trainer, event, what, lr_from=lrs_before)
        return True

    def _failed_why(self, value: float) -> tuple[str | None, bool]:
        """Why the action on probation failed at a stall at ``value`` (None: it did not), whether it did harm."""
        if self._snapshot is None:
            return None, False
        key, mode = self._snapshot["list"], self._detector.mode
        why, harmed, gained = policies.probation_verdict(
            self._snapshot, value, self.actions.get(key) or [], self.spent_by.get(key, 0), self.fruitless,
            self.probation, mode, self._detector.monitor,
        )  # fmt: skip
        self.withdrawn = [] if gained else self.withdrawn
        if gained and key is not None and self.probation is not None:  # a measured gain: first next time
            self.worked = (key, self._snapshot["action"])
        return why, harmed

    def _record(
        self, trainer: L.Trainer, event: StallEvent, what: str, epoch: int | None = None, step: int | None = None,
        lr_raise: bool = False, lr_from: list[float] | None = None,
    ) -> None:  # fmt: skip
        """Add what was done to the event and the history, with the settings the next step will use."""
        epoch, step = event.epoch if epoch is None else epoch, event.step if step is None else step
        record = log_action(trainer, event, what, epoch, step, lr_raise, lr_from)
        self.history.append(record)
        self._unconfirmed.append(record)
