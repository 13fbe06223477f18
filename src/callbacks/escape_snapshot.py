"""The state a remedy can be rolled back to: the weights, every optimizer's state and the policy's kicks.

:class:`~.escape.PlateauEscape` takes one before each action and, when the action makes the run
worse or brings nothing within its probation, restores it; and one where the run is out of a stall,
to come back to, with the optimizer's own settings (:func:`group_settings`), if the escape's settings
blow the run up later. Both are part of the escape's checkpoint, so a resumed run can still roll back.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L

from .escape_actions import EscapeAction, apply_action, apply_to_trainer, fill_momentum_buffers

# Times a run is taken back to the point where it was out of a stall: once with its own settings,
# then with the lr halved each time it diverges from there again, down to 1/512 of it (effectively
# still). A depth-20 width-4 leaky ReLU net of the stall zoo (blobs, seed 3) diverged from its point
# at x1, x0.5, x0.25 and, 20 epochs on, at x0.125: with 4 times it ended blown up (19.1).
SAFE_RETRIES = 10


def take_snapshot(trainer: L.Trainer, pl_module: L.LightningModule, **info: Any) -> dict[str, Any]:
    """The model's and optimizers' state now (copies), with ``info`` (what the snapshot is for)."""
    return {
        **info,
        "model": copy.deepcopy(pl_module.state_dict()),
        "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
    }


def restore_snapshot(
    trainer: L.Trainer, pl_module: L.LightningModule, snapshot: dict[str, Any], weights: bool = True
) -> list[float]:
    """Load ``snapshot``'s weights and optimizer states (``weights=False``: only each param group's
    settings, lr and momentum...); each scheduler's ``base_lrs`` follow the lr back (an lr raise
    scaled them too). Returns the first optimizer's lrs before the restore."""
    lrs_before = [[float(g["lr"]) for g in o.param_groups] for o in trainer.optimizers]
    if weights:
        pl_module.load_state_dict(snapshot["model"])
        for optimizer, state in zip(trainer.optimizers, snapshot["optimizers"], strict=True):
            # a copy: the optimizer takes its state's tensors as they are (momentum buffers, Adam's
            # moments) and its steps would change the snapshot, which a safe point is restored from again
            optimizer.load_state_dict(copy.deepcopy(state))
    else:
        for optimizer, state in zip(trainer.optimizers, snapshot["optimizers"], strict=True):
            for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    for optimizer, before in zip(trainer.optimizers, lrs_before, strict=True):
        for index, (group, lr) in enumerate(zip(optimizer.param_groups, before, strict=True)):
            for scheduler in schedulers:
                if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs") and lr > 0:
                    scheduler.base_lrs[index] *= float(group["lr"]) / lr
        fill_momentum_buffers(optimizer)  # settings of a time before the state's buffers were cleared
    return lrs_before[0]


def note_check(snapshot: dict[str, Any], value: float, mode: str, keep: int) -> None:
    """Keep the best monitored value since the snapshot (what its action's probation is judged on)
    and the last ``keep`` values (``recent``: where the run sits, harm is judged on them); after a
    re-placement (``ref`` pending) the first value is the reference it is judged from."""
    if "ref" in snapshot and snapshot["ref"] is None:
        snapshot["ref"] = snapshot["best"] = value
    snapshot["best"] = max(snapshot["best"], value) if mode == "max" else min(snapshot["best"], value)
    snapshot["recent"] = [*snapshot.get("recent", []), value][-keep:]


def group_settings(trainer: L.Trainer) -> list[list[dict[str, Any]]]:
    """Each optimizer's param-group settings but the lr (momentum, betas, eps...), copied; taken
    before the escape's first action, they are the run's own (the lr is the scheduler's and the kicks')."""
    skip = ("params", "lr", "initial_lr")
    groups = [o.param_groups for o in trainer.optimizers]
    return [[{k: copy.deepcopy(v) for k, v in g.items() if k not in skip} for g in listed] for listed in groups]


def put_settings(trainer: L.Trainer, settings: list[list[dict[str, Any]]]) -> None:
    """Set each param group's settings back to ``settings`` (from :func:`group_settings`)."""
    for optimizer, groups in zip(trainer.optimizers, settings, strict=True):
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update(copy.deepcopy(saved))
        fill_momentum_buffers(optimizer)


def back_to_safe(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    safe: dict[str, Any],
    own: list[list[dict[str, Any]]] | None,
    why: str = "diverged",
) -> tuple[list[float], str]:
    """Load ``safe`` (a snapshot: where the run was out of a stall, or where a divergence was rolled
    back to before the run was ever out), undo the lr raise in force when it was taken, and put the
    optimizers' ``own`` settings back (:func:`group_settings`; None: keep those of ``safe``); each time
    after the first (``tries``), with half the lr of the time before: the run diverged from this point
    under those settings. Returns the first optimizer's lrs before, and what was done (``why``, then
    where it went back to)."""
    lrs_before = restore_snapshot(trainer, pl_module, safe)
    safe["tries"] = safe.get("tries", 0) + 1
    factor = 0.5 ** (safe["tries"] - 1) / safe["kicks"][0]
    if factor != 1.0:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            apply_action(optimizer, EscapeAction(lr_factor=factor), schedulers)
    if own is not None:
        put_settings(trainer, own)
    lr = f", lr x{0.5 ** (safe['tries'] - 1):g}" if safe["tries"] > 1 else ""
    where = f", before '{safe['action']}'" if safe.get("action") else " (out of the stall)"  # a divergence's point
    settings = "its own settings back" if own is not None else "its settings then, the kicks kept"
    return lrs_before, f"{why}: rolled back to epoch {safe['epoch']}{where}, {settings}{lr}"


def put_own(trainer: L.Trainer, own: list[list[dict[str, Any]]] | None, lr_scale: float) -> bool:
    """The optimizers' ``own`` settings back (:func:`group_settings`; None: no action was taken), with the
    lr raises in force (``lr_scale``) undone; whether any setting was not the optimizers' own."""
    if own is None or (lr_scale == 1.0 and group_settings(trainer) == own):
        return False
    if lr_scale != 1.0:
        apply_to_trainer(trainer, EscapeAction(lr_factor=1 / lr_scale))
    put_settings(trainer, own)
    return True


def _own_eps(trainer: L.Trainer, own: list[list[dict[str, Any]]] | None) -> list[tuple[dict[str, Any], float]]:
    """Each param group that has an ``eps``, with the optimizer's own (``own``: :func:`group_settings`)."""
    groups = [g for o in trainer.optimizers for g in o.param_groups]
    saved = [g for listed in own or [] for g in listed]
    return [(group, s["eps"]) for group, s in zip(groups, saved, strict=False) if "eps" in s]


def eps_kicked(trainer: L.Trainer, own: list[list[dict[str, Any]]] | None) -> bool:
    """Whether some param group's ``eps`` is not the optimizer's own."""
    return any(group["eps"] != eps for group, eps in _own_eps(trainer, own))


def put_eps_back(trainer: L.Trainer, own: list[list[dict[str, Any]]] | None) -> None:
    """Each param group's ``eps`` back to the optimizer's own."""
    for group, eps in _own_eps(trainer, own):
        group["eps"] = eps
