"""What an escape action does to an optimizer's ``param_groups``: plain functions, no Lightning.

:class:`~.escape.PlateauEscape` applies these on a stall; they are tested on a bare optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EscapeAction:
    """One remedy for a stall, applied to every param group of the optimizer.

    Args:
        momentum: Set SGD's momentum to this value in [0, 1); stale momentum buffers are cleared.
        nesterov: Turn Nesterov momentum on or off (needs momentum > 0).
        compensate_lr: With ``momentum``: scale lr by (1 - new) / (1 - old) so the effective step
            size lr / (1 - momentum) stays the same. Off by default: the larger effective step is
            much of why momentum gets a net off a plateau.
        lr_factor: Multiply the learning rate by this factor (> 0).
        max_lr: Cap the learning rate this action can reach.
    """

    momentum: float | None = None
    nesterov: bool | None = None
    compensate_lr: bool = False
    lr_factor: float | None = None
    max_lr: float | None = None

    def __post_init__(self) -> None:
        if self.momentum is None and self.nesterov is None and self.lr_factor is None:
            raise ValueError("an escape action must set momentum, nesterov or lr_factor")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"escape action momentum must be in [0, 1), got {self.momentum}")
        if self.lr_factor is not None and not self.lr_factor > 0:
            raise ValueError(f"escape action lr_factor must be > 0, got {self.lr_factor}")
        if self.max_lr is not None and not self.max_lr > 0:
            raise ValueError(f"escape action max_lr must be > 0, got {self.max_lr}")

    def describe(self) -> str:
        parts = []
        if self.momentum is not None:
            parts.append(f"momentum {self.momentum}" + (" (lr compensated)" if self.compensate_lr else ""))
        if self.nesterov is not None:
            parts.append(f"nesterov {'on' if self.nesterov else 'off'}")
        if self.lr_factor is not None:
            parts.append(f"lr x{self.lr_factor:g}" + (f" (max {self.max_lr:g})" if self.max_lr is not None else ""))
        return ", ".join(parts)


DEFAULT_ACTIONS = (
    EscapeAction(momentum=0.9),
    EscapeAction(momentum=0.99),
    EscapeAction(lr_factor=5, max_lr=0.5),
    EscapeAction(lr_factor=2, max_lr=1.0),
)


def check_applicable(optimizer: torch.optim.Optimizer, action: EscapeAction) -> None:
    """Raise ``ValueError`` naming the optimizer when ``action`` cannot apply to it (momentum on Adam)."""
    for key, wanted in (("momentum", action.momentum), ("nesterov", action.nesterov)):
        if wanted is not None and any(key not in group for group in optimizer.param_groups):
            raise ValueError(
                f"PlateauEscape action '{action.describe()}' needs an optimizer with '{key}' (such as "
                f"torch.optim.SGD), but the optimizer is {type(optimizer).__name__}: remove the action or change "
                "the optimizer"
            )


def apply_action(
    optimizer: torch.optim.Optimizer, action: EscapeAction, schedulers: Sequence[Any] = ()
) -> dict[str, list[float]]:
    """Change ``optimizer.param_groups`` in place and return the new ``lr`` and ``momentum`` per group.

    The optimizer object is never replaced, so schedulers, ``LearningRateMonitor`` and checkpoints
    keep working. An lr raise is also applied to ``initial_lr`` and to each scheduler's ``base_lrs``,
    so that schedulers which recompute the lr from them (``LambdaLR``, ``CosineAnnealingLR``...) keep it.
    """
    check_applicable(optimizer, action)
    for index, group in enumerate(optimizer.param_groups):
        factor = 1.0
        if action.momentum is not None:
            if action.compensate_lr:
                factor *= (1 - action.momentum) / (1 - group["momentum"])
            group["momentum"] = action.momentum
            for param in group["params"]:
                optimizer.state.get(param, {}).pop("momentum_buffer", None)
        if action.nesterov is not None:
            group["nesterov"] = action.nesterov
        if action.lr_factor is not None:
            factor *= action.lr_factor
        if factor != 1.0 and float(group["lr"]) > 0:  # an lr of 0 (a warm-up's first step) stays 0
            new_lr = float(group["lr"]) * factor
            if action.max_lr is not None:
                new_lr = min(new_lr, action.max_lr)
            factor = new_lr / float(group["lr"])
            group["lr"] = new_lr if not isinstance(group["lr"], torch.Tensor) else group["lr"].fill_(new_lr)
            if "initial_lr" in group:
                group["initial_lr"] *= factor
            for scheduler in schedulers:
                if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs[index] *= factor
    return {
        "lr": [float(group["lr"]) for group in optimizer.param_groups],
        "momentum": [float(group.get("momentum", 0.0)) for group in optimizer.param_groups],
    }


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
