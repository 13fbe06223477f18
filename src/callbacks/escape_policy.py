"""The default escape policy, per diagnosis, and how a policy is read and walked: plain functions.

:class:`~.escape.PlateauEscape` takes each stall's action from here; what an action does to an
optimizer is :mod:`.escape_actions`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from .escape_actions import EscapeAction, adapted, changes_nothing, check_applicable
from .events import moved_past
from .plateau_rule import DIAGNOSES

# A repeating action (layer-wise steps, re-placed units) is given this many probations in a row
# without gain before it is withdrawn: layer-wise steps need 70-270 epochs on a deep sigmoid net.
# A re-placement that did harm gets this many tries in all (new units each time), the later ones
# once every other action is spent: the stall zoo's xor nets of seeds 0 and 4 sat at 0.477 from
# epoch 1028 and 1190 on with every action spent; with the tries they reach 0.05 at 1979 and 1199.
PATIENT_REPEATS = 3
# Kicks (lr raises, layer-wise steps) undone once the run is out of the stall come back where, in as many
# steps as they were in force, the run falls by less than this share of the drop they brought: the
# optimizer's own steps would take it on at a crawl. The stall zoo's blobs net under RMSprop (sigmoid,
# depth 12, width 8, lr 0.001): out of a plateau at 0.82 to 0.41 in ~110 epochs, then 0.41 -> 0.36 in
# the 1000 left, never a stall (a 1% drop in 200 epochs is progress).
CRAWL = 0.1
# Layer-wise steps whose undo blew the run up come back this many times as large, and stay: the net
# they got out is too sharp for the optimizer's own step (the stall zoo's blobs net, leaky ReLU, depth 20,
# width 4, SGD lr 0.01, blew up with the momentum undone too), and at the kick's size it crawls (0.69 ->
# 0.22 in 1500 epochs). That cell, seeds 0-23: 8 -> 13 of 24 reach 0.05 (a tenth as large: 3 of seeds
# 0-11, against 5); seeds 24-47: 6 -> 12, with the safe point's kicks kept; the zoo's other cells,
# seeds 0-23: 3 runs lost, 1 gained.
KEPT_STEPS = 3
# Where the run sits, harm is judged on: the median of the last this many checks (a stall reported on a
# spike is no harm; a loss that has risen and stays up is).
RECENT_CHECKS = 5
# For vanishing gradients: layer-wise steps of 0.001 x |W| under momentum 0.9, which add up to
# ~0.01 x |W| a step (`adapted`: 0.01 x |W| without momentum where the optimizer has none, and under
# momentum where the step taken is set, RMSprop's: at 0.001 x |W| the zoo's depth-18 sigmoid net sat
# at 0.693 through all 3 probations, 9 of 9 seeds; at 0.01 all reach 0.05 within 250 epochs); the
# momentum stays once the steps are undone. Against layer-wise steps of 0.01 with no momentum, on
# Fashion-MNIST (784-128x9-10 sigmoid, SGD lr 0.05, batch 100): val acc after 10 epochs 82-86% (72-76%);
# with the momentum undone along with the steps, 86.2, 75.1, 77.7, 73.7% (seeds 0-3).
VANISHING_STEPS = EscapeAction(trust_ratio=0.001, momentum=0.9, repeat=True)
# Each a whole setting, not a step on the last: an action that brings nothing is withdrawn before
# the next is tried (PlateauEscape's probation). Momentum 0.9 (the source study's remedy); then, as
# the run may sit in a local minimum, each layer's weakest unit re-placed with layer-wise steps; then
# layer-wise steps under momentum; then the re-placement again, on every later stall. Measured
# against the source's longer list (momentum 0.9, 0.99, then 0.99 with the lr x5 and x10, then the
# re-placement): the stall zoo 11 of 15 freed (10), the lab's XOR 5 of 6 in 5740-7552 epochs
# (6424-8332), the grid 81/81 with sigmoid depth 6-8 in 347-403 epochs (424-674); the lr raises
# freed no run the rest did not, and diverged twice in the zoo. Layer-wise steps before the
# re-placement pinned the lab's 2-2-1 net's hidden units (2 of 6 freed). (Measured with the
# detector's epoch rule alone; with its step rule over 2 x patience, the lab's XOR 6 of 6 in 860-1826.)
FLAT_ACTIONS = (
    EscapeAction(momentum=0.9),
    EscapeAction(recycle=True, trust_ratio=0.01, momentum=0.0),
    EscapeAction(trust_ratio=0.001, momentum=0.9),
    EscapeAction(recycle=True, trust_ratio=0.01, momentum=0.0, repeat=True),
)
# Idle ReLU units re-placed, then layer-wise steps: at lr 0.1 a deep ReLU net's re-placed units die
# again within one patience (ReLU 14 seed 1 of the study: 20 re-placements, never out); with the
# steps, every ReLU depth 12-14 study run got out (median epoch 376-403 vs 988-1464).
REPLACE_UNITS = (EscapeAction(replace_units=True, trust_ratio=0.01, momentum=0.0, repeat=True),)
# Pinned units of a sigmoid or tanh net re-placed, the outgoing weights zeroed (ReDo), on every
# such stall.
REPLACE_PINNED = (EscapeAction(replace_units=True, repeat=True),)
# The default policy, per diagnosis; "any" serves the other diagnoses, and a diagnosis whose own
# list is spent. Vanishing gradients get layer-wise steps; idle ReLU units are re-placed (with
# layer-wise steps); a flat region gets the source study's momentum, then the weakest units
# re-placed and layer-wise steps. Measured with SGD; with an optimizer that has no momentum setting (Adam,
# AdamW) the momentum parts are left out (see `adapted`) and layer-wise steps act on its update.
# Under Adam-like optimizers eps 1e-16 comes first. Withdrawn for no gain in the loss, it is not in
# vain (the weights keep what it moved): without it, the stall zoo's depth-18 sigmoid nets (seeds 0-23)
# reach 0.05 in a median 1073.5 (Adam), 1088.5 (AdamW), 1153 (RMSprop) epochs, not 727, 757, 445; its
# blobs RMSprop net frees 20 of 24, not 15 (the Adam-like cells: 91 of 96 stalls freed, not 87; their
# fix runs made worse 7 of 216, not 4).
DEFAULT_ACTIONS: dict[str, tuple[EscapeAction, ...]] = {
    "vanishing": (EscapeAction(eps=1e-16), VANISHING_STEPS),  # eps: Adam and the like only (`adapted`)
    "dead_units": REPLACE_UNITS,
    "always_on_units": REPLACE_UNITS,
    "redundant_units": REPLACE_UNITS,
    "saturated_units": REPLACE_PINNED,
    "any": FLAT_ACTIONS,
}


def parse_policy(actions: Any) -> dict[str, list[EscapeAction]]:
    """A policy, per diagnosis (or ``any``), from a mapping of lists of actions (or their YAML
    mappings) or a plain list (``{any: [...]}``); ``ValueError`` naming what is wrong."""
    policy = {"any": actions} if isinstance(actions, (list, tuple)) else dict(actions)
    unknown = set(policy) - {*DIAGNOSES, "any"}
    if unknown:
        raise ValueError(f"unknown diagnosis {sorted(unknown)} in actions; use {', '.join(DIAGNOSES)} or any")
    parsed = {key: [as_action(a) for a in listed] for key, listed in policy.items()}
    if not any(parsed.values()):
        raise ValueError("actions is empty; give at least one, or leave it out for the defaults")
    return parsed


def next_in_policy(
    policy: dict[str, list[EscapeAction]], spent_by: dict[str, int], failed: Sequence[str], diagnosis: str | None,
    avoid: Sequence[str] = (), first: Sequence[str] | None = None,
) -> tuple[str, EscapeAction, int] | None:  # fmt: skip
    """The action the next stall with ``diagnosis`` gets, the list it comes from and how far that
    list is then spent: the diagnosis's list, then ``any``; a spent list's last action again if it
    repeats (unless the list ``failed``: its repeating action was rolled back). An action described
    in ``avoid`` (it brought nothing at this stall, from any list) is passed over: spent. ``first``
    (a list and an action it holds, described: the action that got the run out of its last stall)
    comes before them, where it is not avoided; the lists stay as far spent as they were.

    >>> policy = {"vanishing": [EscapeAction(trust_ratio=0.01, repeat=True)], "any": [EscapeAction(momentum=0.9)]}
    >>> next_in_policy(policy, {"vanishing": 3}, [], "vanishing")[::2]  # spent, and it repeats
    ('vanishing', 4)
    >>> next_in_policy(policy, {"vanishing": 3}, ["vanishing"], "vanishing")[0]  # its repeat was rolled back
    'any'
    >>> key, action, spent = next_in_policy(policy, {}, [], "vanishing", avoid=["layer-wise steps of 0.01 x |W|"])
    >>> key, action.describe(), spent  # the steps brought nothing at this stall: momentum instead
    ('any', 'momentum 0.9', 1)
    >>> next_in_policy(policy, {"any": 1}, [], "vanishing", first=("any", "momentum 0.9"))[::2]  # it worked
    ('any', 1)
    """
    key, described = first or (None, None)
    again = [a for a in policy.get(key) or [] if a.describe() == described and described not in avoid]
    if again and key not in failed:
        return key, again[-1], spent_by.get(key, 0)
    for key in (diagnosis, "any"):
        listed = policy.get(key) or []
        if not listed or key in failed:
            continue
        spent = spent_by.get(key, 0)
        for at in range(spent, len(listed)):
            if listed[at].describe() not in avoid:
                return key, listed[at], at + 1
        if listed[-1].repeat and listed[-1].describe() not in avoid:
            return key, listed[-1], max(spent, len(listed)) + 1
    return None


def probation_verdict(
    snapshot: dict[str, Any], value: float, listed: Sequence[EscapeAction], spent: int, fruitless: dict[str, int],
    probation: float | None, mode: str, monitor: str,
) -> tuple[str | None, bool, bool]:  # fmt: skip
    """Why the action on probation (taken at ``snapshot``, from list ``listed``, ``spent`` far) failed,
    at a new stall at ``value``; whether it did harm; whether it brought a gain.

    Harm, judged on where the run sits (the median of the snapshot's ``recent`` checks, the last
    ``RECENT_CHECKS``, the stall's ``value`` among them): it left the run twice as bad as the stall it
    answered; or worse than both that stall and the escape's first (the snapshot's ``first``: where
    the run without the escape would sit); or a re-placement left it worse than the stall it answered
    (its weights go too). A stall reported on a spike is no harm: the stall zoo's blobs net under
    RMSprop (seed 0) lost a re-placement that had taken it from 0.48 to 0.35 to a stall reported on a
    spike of 1.13, and the next re-placement blew it up to 5.7, above the run without the policy.

    No gain (an action, not an undo): the best value since it was taken is not ``probation`` better
    than at that stall (its settings are withdrawn; the weights keep what they learnt, which on a
    plateau is progress the loss does not show yet). A repeating action gets ``PATIENT_REPEATS``
    probations in a row, counted in ``fruitless`` (layer-wise steps free a deep sigmoid net in 70-270
    epochs: more than one patience). ``(None, False, gained)`` if it did not fail.

    >>> snapshot = {"value": 0.69, "best": 0.5, "list": "any"}
    >>> probation_verdict(snapshot, 0.6, [EscapeAction(momentum=0.9)], 1, {}, 0.01, "min", "loss")
    (None, False, True)
    >>> probation_verdict(snapshot, 1.5, [EscapeAction(momentum=0.9)], 1, {}, 0.01, "min", "loss")
    ('loss rose to 1.5', True, False)
    >>> spiked = snapshot | {"recent": [0.52, 0.5, 1.5]}  # the run sits at 0.52: the stall's 1.5 is a spike
    >>> probation_verdict(spiked, 1.5, [EscapeAction(momentum=0.9)], 1, {}, 0.01, "min", "loss")
    (None, False, True)
    >>> found_lower = snapshot | {"first": 0.7}  # the escape found the run at 0.7; it sits at 0.8
    >>> probation_verdict(found_lower, 0.8, [EscapeAction(momentum=0.9)], 1, {}, 0.01, "min", "loss")
    ("loss rose to 0.8, above the first stall's 0.7", True, False)
    """
    key, sits = snapshot["list"], statistics.median(snapshot.get("recent") or [value])  # a spike is no harm
    # twice as bad: a re-placement starts the loss afresh, from the first check after it
    at, best = snapshot.get("ref") or snapshot["value"], snapshot["best"]
    if (sits < at / 2) if mode == "max" else (sits > 2 * at):
        return f"{monitor} rose to {sits:.4g}", True, False
    at = snapshot["value"]
    if "ref" in snapshot and probation and moved_past(at, sits, 1 - probation, mode):
        return f"{monitor} stalls at {sits:.4g}, above {at:.4g} before the re-placement", True, False
    first = snapshot.get("first", at)  # where the escape found the run
    if probation and moved_past(first, sits, 1 - probation, mode) and moved_past(at, sits, 1 - probation, mode):
        return f"{monitor} rose to {sits:.4g}, above the first stall's {first:.4g}", True, False
    at = snapshot.get("floor", at)  # the plateau's floor: a stall reported on a noisy high is no gain to beat
    if key is None or probation is None or moved_past(best, at, 1 - probation, mode):
        fruitless.pop(key, None)
        return None, False, True
    if listed and listed[-1].repeat and spent >= len(listed):
        fruitless[key] = fruitless.get(key, 0) + 1
        if fruitless[key] < PATIENT_REPEATS:
            return None, False, False
    return f"no gain on probation (best {best:.4g} vs {at:.4g})", False, False


def plateau_floor(snapshot: dict[str, Any] | None, value: float, harmed: bool, mode: str) -> float:
    """What the gain of the action taken at a stall at ``value`` is judged on: the plateau's floor. That
    is the best value since the action ``snapshot`` was taken for, where it is better than ``value``
    (a noisy loss is as often reported on a high as on a low), or, where that action is rolled back
    (``harmed``), the value the run goes back to. The stall zoo's xor net (sigmoid, depth 10, width 4,
    SGD lr 1.0), held-out seed 14: stalls at 0.3512 and 0.3467 around a floor of 0.3467, each a 1%
    gain on the last, kept the same layer-wise steps on from epoch 1149 to the end (0.347); judged
    on the floor, they were withdrawn at 1706, and it reached 0.05 at 1818.

    >>> plateau_floor({"value": 0.35, "best": 0.3467}, 0.3512, False, "min")
    0.3467
    >>> plateau_floor({"value": 0.35, "best": 0.3467}, 0.3512, True, "min"), plateau_floor(None, 0.7, False, "min")
    (0.35, 0.7)
    """
    if snapshot is None:
        return value
    if harmed:
        return snapshot["value"]
    return max(value, snapshot["best"]) if mode == "max" else min(value, snapshot["best"])


def crawling(undone: dict[str, Any], step: int, mode: str) -> tuple[float, float] | None:
    """Whether the run crawls since its kicks were undone (``undone``: the snapshot taken then, with
    ``stall``, the value at the stall they answered, ``value`` and ``best`` since, ``step``, and
    ``raised_step``, the step they were taken at): once as many steps have passed as they were in force,
    it has fallen by less than ``CRAWL`` of the drop they brought. That drop and the one since, or None.

    >>> undone = {"stall": 0.75, "value": 0.375, "best": 0.359375, "step": 1000, "raised_step": 900}
    >>> crawling(undone, 1050, "min"), crawling(undone, 1100, "min")  # 0.016 in 100 steps, after 0.375 in 100
    (None, (0.375, 0.015625))
    """
    if undone.get("raised_step") is None or step - undone["step"] < undone["step"] - undone["raised_step"]:
        return None
    sign = 1.0 if mode == "min" else -1.0
    kicked, since = sign * (undone["stall"] - undone["value"]), sign * (undone["value"] - undone["best"])
    return (kicked, since) if since < CRAWL * kicked else None


def relapsed(safe: dict[str, Any] | None, value: float, probation: float | None, mode: str) -> bool:
    """Whether a stall at ``value`` is back at the stall the run was out of where it took ``safe``
    (its ``left``), within ``probation``: what the escape gained is lost.

    >>> relapsed({"left": 0.69}, 0.6875, 0.01, "min"), relapsed({"left": 0.69}, 0.6, 0.01, "min")
    (True, False)
    """
    left = (safe or {}).get("left")
    return left is not None and probation is not None and not moved_past(value, left, 1 - probation, mode)


def too_late(trainer: Any, detector: Any) -> str | None:
    """Why an action taken now could not be judged before the fit ends (None: it can). An action is judged at
    the next stall, which ``detector`` reports at the earliest ``patience`` (+ ``cooldown``) checks later, at a
    check every epoch (every validation), or once its step rule's window is full: left on at the end of a fit,
    it could leave the run worse than without it, with no probation to roll it back. The stall zoo's blobs
    net under Adam (leaky ReLU, depth 20, width 4): a re-placement 60 epochs before the end took it from 0.36
    to 1.81, where the run without the escape sat at 1.39. Steps are ``trainer.global_step``'s: under manual
    optimization, every ``optimizer.step()`` (a GAN's two a batch)."""
    total = trainer.estimated_stepping_batches  # inf, or -1 (a stream without max_steps): no end to come
    if not 0 <= total < math.inf:
        return None
    batches = trainer.num_training_batches if detector.check_on_train_epoch_end else trainer.val_check_batch
    if trainer.lightning_module.automatic_optimization:
        left = total - trainer.global_step
        per_check = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else math.inf
    else:  # each optimizer.step() is a step (a GAN's two a batch), where Lightning's estimate counts batches
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        rate = trainer.global_step / done if done and trainer.global_step else 1.0
        epochs = trainer.max_epochs * trainer.num_training_batches if trainer.max_epochs not in (None, -1) else math.inf
        steps = trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else math.inf
        left, per_check = math.floor(min((epochs - done) * rate, steps)), batches * rate
    checks = detector.tracker.patience + detector.tracker.cooldown
    need = math.ceil(checks * per_check) if math.isfinite(per_check) else math.inf
    need = min(need, detector.steps.rule.window) if detector.watches_steps else need
    return f"none: {left} steps left, fewer than the {need} it takes to judge an action" if left < need else None


def idle_actions(policy: dict[str, list[EscapeAction]], optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
    """The actions of ``policy`` that would change nothing in ``optimizers`` (:func:`changes_nothing`),
    described: a stall is not spent on them (momentum 0.9 where the layer-wise steps left it on)."""
    return [action.describe() for listed in policy.values() for action in listed if changes_nothing(action, optimizers)]


def policy_for(
    policy: dict[str, list[EscapeAction]], optimizers: Sequence[torch.optim.Optimizer], adapt: bool
) -> dict[str, list[EscapeAction]]:
    """``policy`` as it applies to ``optimizers``: each action :func:`adapted` to them (``adapt``:
    the default policy), or checked against them (:func:`check_applicable`: a user's policy)."""
    policy = {key: list(listed) for key, listed in policy.items()}
    for optimizer in optimizers:
        for key, listed in policy.items():
            if not adapt:
                for action in listed:
                    check_applicable(optimizer, action)
            else:
                policy[key] = [kept for a in listed if (kept := adapted(a, optimizer)) is not None]
    return policy


def as_action(action: EscapeAction | dict[str, Any]) -> EscapeAction:
    """An :class:`EscapeAction` from itself or from its YAML mapping, naming an unknown key."""
    if isinstance(action, EscapeAction):
        return action
    if not isinstance(action, dict):
        raise ValueError(f"each action must be a mapping, got {action!r}")
    unknown = set(action) - {f.name for f in dataclasses.fields(EscapeAction)}
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(EscapeAction))
        raise ValueError(f"unknown action key {sorted(unknown)}; an action takes {known}")
    return EscapeAction(**action)
