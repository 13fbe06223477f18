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
        trust_ratio: From now until the run is out of the stall, scale each weight layer's gradient
            so that its SGD step is this fraction of the layer's weight norm (LARS's trust ratio; see
            :func:`trust_ratio_`): the first layers of a net whose gradients vanish move as fast as
            the last. The remedy for ``vanishing``; needs SGD.
        eps: Set the optimizer's ``eps`` (Adam, AdamW, RMSprop) to this value. Where gradients
            vanish below it (1e-8 by default), Adam's step is ``m / eps``, not its normalised
            size, and the early layers do not move: a depth-18 sigmoid net stays at ln 2 for 2000
            epochs at 1e-8 and learns at 1e-16 (0.063 by epoch 1000). A kick, as an lr raise: put back
            once the run is out of the stall, or once every action is spent (kept at 1e-16, Adam's
            steps took a stall zoo run rolled back into its minimum out of it: xor, seed 3, 0.478 -> 0.694).
        replace_units: Re-place the units the stall names: ReLU units dead, always on, or the second
            of a redundant pair, with new ones whose kink is on a training point (see
            :func:`~.units.replace_units`); units of a bounded activation pinned at a bound, with new
            ones centred on a training point (see :class:`~.saturated.PinnedUnits`). The remedy for
            the unit diagnoses and ``saturated_units``.
        recycle: Re-place the weakest unit of each hidden layer of a plain MLP (see
            :meth:`~.saturated.PinnedUnits.weakest`), by ReDo's rule: a kick out of a local minimum
            where no unit is idle (the lab's XOR net). Measured: see :mod:`.saturated`.
        repeat: Once reached, apply this action again on every later stall it is chosen for, instead
            of moving on (re-placing units may take a few rounds).
    """

    momentum: float | None = None
    nesterov: bool | None = None
    compensate_lr: bool = False
    lr_factor: float | None = None
    max_lr: float | None = None
    trust_ratio: float | None = None
    eps: float | None = None
    replace_units: bool = False
    recycle: bool = False
    repeat: bool = False

    def __post_init__(self) -> None:
        for name in ("compensate_lr", "replace_units", "recycle", "repeat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"escape action {name} must be true or false, got {getattr(self, name)!r}")
        if not self.sets_optimizer and self.trust_ratio is None and not (self.replace_units or self.recycle):
            raise ValueError(
                "an escape action must set momentum, nesterov, lr_factor, eps, trust_ratio, replace_units or recycle"
            )
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"escape action eps must be > 0, got {self.eps}")
        if self.trust_ratio is not None and not 0 < self.trust_ratio < 1:
            raise ValueError(f"escape action trust_ratio must be in (0, 1), got {self.trust_ratio}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"escape action momentum must be in [0, 1), got {self.momentum}")
        if self.lr_factor is not None and not self.lr_factor > 0:
            raise ValueError(f"escape action lr_factor must be > 0, got {self.lr_factor}")
        if self.max_lr is not None and not self.max_lr > 0:
            raise ValueError(f"escape action max_lr must be > 0, got {self.max_lr}")

    @property
    def sets_optimizer(self) -> bool:
        """Whether it changes the optimizer's param groups (momentum, nesterov, lr, eps)."""
        return (self.momentum, self.nesterov, self.lr_factor, self.eps) != (None,) * 4

    def describe(self) -> str:
        parts = []
        if self.momentum is not None:
            parts.append(f"momentum {self.momentum}" + (" (lr compensated)" if self.compensate_lr else ""))
        if self.nesterov is not None:
            parts.append(f"nesterov {'on' if self.nesterov else 'off'}")
        if self.lr_factor is not None:
            parts.append(f"lr x{self.lr_factor:g}" + (f" (max {self.max_lr:g})" if self.max_lr is not None else ""))
        if self.eps is not None:
            parts.append(f"eps {self.eps:g}")
        if self.trust_ratio is not None:
            parts.append(f"layer-wise steps of {self.trust_ratio:g} x |W|")
        if self.replace_units:
            parts.append("re-place idle units")
        if self.recycle:
            parts.append("re-place each layer's weakest unit")
        return ", ".join(parts)


def apply_to_trainer(trainer: Any, action: EscapeAction, keep_buffers: bool = False) -> None:
    """:func:`apply_action` on each of a Lightning ``trainer``'s optimizers, with its schedulers."""
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    for optimizer in trainer.optimizers:
        apply_action(optimizer, action, schedulers, keep_buffers)


def check_applicable(optimizer: torch.optim.Optimizer, action: EscapeAction) -> None:
    """Raise ``ValueError`` naming the optimizer when ``action`` cannot apply to it (momentum on Adam).
    Layer-wise steps apply to any optimizer (see :func:`steps_on_gradients`)."""
    for key, wanted in (("momentum", action.momentum), ("nesterov", action.nesterov), ("eps", action.eps)):
        if wanted is not None and any(key not in group for group in optimizer.param_groups):
            raise ValueError(
                f"PlateauEscape action '{action.describe()}' needs an optimizer with '{key}' (such as "
                f"torch.optim.SGD), but the optimizer is {type(optimizer).__name__}: remove the action or change "
                "the optimizer"
            )


def adapted(action: EscapeAction, optimizer: torch.optim.Optimizer) -> EscapeAction | None:
    """``action`` without the parts ``optimizer`` has no setting for (momentum and nesterov on Adam),
    or ``None`` if nothing is left: how the default policy serves any optimizer.

    >>> adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    >>> adapted(EscapeAction(trust_ratio=0.01, momentum=0.0), adam).describe()
    'layer-wise steps of 0.01 x |W|'
    >>> adapted(EscapeAction(momentum=0.9), adam) is None
    True
    >>> adapted(EscapeAction(trust_ratio=0.001, momentum=0.9), adam).describe()  # the same step size
    'layer-wise steps of 0.01 x |W|'
    >>> rmsprop = torch.optim.RMSprop([torch.nn.Parameter(torch.zeros(1))])
    >>> adapted(EscapeAction(trust_ratio=0.001, momentum=0.9), rmsprop).describe()  # set on the step taken
    'momentum 0.9, layer-wise steps of 0.01 x |W|'
    """
    has = {key: all(key in group for group in optimizer.param_groups) for key in ("momentum", "nesterov", "eps")}
    kept: dict[str, Any] = {key: getattr(action, key) if has[key] else None for key in has}
    if (*kept.values(), action.lr_factor, action.trust_ratio) == (None,) * 5 and not (
        action.replace_units or action.recycle
    ):
        return None
    if action.trust_ratio is not None and action.momentum and not (has["momentum"] and steps_on_gradients(optimizer)):
        # SGD's steps under momentum add up to 1 / (1 - momentum) of one: the same size without it, or
        # where the step taken is set (:func:`trust_update_`), momentum's sum in it (RMSprop's)
        kept["trust_ratio"] = min(action.trust_ratio / (1 - action.momentum), 0.5)
    return dataclasses.replace(action, **kept)


def steps_on_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether layer-wise steps can be set through the gradients (plain SGD: the step is ``lr * grad``);
    for any other optimizer they are set on the step it took (:func:`trust_update_`)."""
    return type(optimizer) is torch.optim.SGD


def settings_of(optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
    """Each param group's ``lr`` and ``momentum`` (0 where it has none)."""
    groups = optimizer.param_groups
    return {"lr": [float(g["lr"]) for g in groups], "momentum": [float(g.get("momentum", 0.0)) for g in groups]}


def confirm_settings(records: Sequence[Any], optimizer: torch.optim.Optimizer) -> bool:
    """Set each record's ``lr`` and ``momentum`` (an :class:`~.events.Action`) to what ``optimizer``
    holds now; whether any changed (a scheduler stepped after the action)."""
    settings = settings_of(optimizer)
    changed = [r for r in records if (r.lr, r.momentum) != (settings["lr"], settings["momentum"])]
    for record in changed:
        record.lr, record.momentum = settings["lr"], settings["momentum"]
    return bool(changed)


def changes_nothing(action: EscapeAction, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Whether ``action`` only sets settings that every param group already has (momentum 0.9
    where it is 0.9 already): applying it would change nothing."""
    if action.lr_factor is not None or action.trust_ratio is not None or action.replace_units or action.recycle:
        return False
    wanted = {"momentum": action.momentum, "nesterov": action.nesterov, "eps": action.eps}
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    return all(group.get(key) == value for key, value in wanted.items() if value is not None for group in groups)


def _schedulers_of(optimizer: torch.optim.Optimizer, schedulers: Sequence[Any]) -> list[Any]:
    return [scheduler for scheduler in schedulers if getattr(scheduler, "optimizer", None) is optimizer]


def apply_action(
    optimizer: torch.optim.Optimizer, action: EscapeAction, schedulers: Sequence[Any] = (), keep_buffers: bool = False
) -> dict[str, list[float]]:
    """Change ``optimizer.param_groups`` in place and return the new ``lr`` and ``momentum`` per group.

    Only the ``momentum``, ``nesterov`` and ``lr_factor`` parts act here; ``trust_ratio`` and
    ``replace_units`` need the model (:func:`trust_ratio_`, :func:`~.units.replace_units`).

    The optimizer object is never replaced, so schedulers, ``LearningRateMonitor`` and checkpoints
    keep working. A scheduler that recomputes the lr or momentum at every step would overwrite the
    change at the next one, so the change goes into what it computes them from as well: an lr raise
    scales ``initial_lr``, OneCycleLR's ``max_lr`` / ``min_lr`` and each scheduler's ``base_lrs``
    (and CyclicLR's ``max_lrs``); a new momentum replaces OneCycleLR's ``base_momentum`` /
    ``max_momentum`` and CyclicLR's ``base_momentums`` / ``max_momentums`` (the cycle stops there).
    A new momentum clears the momentum buffers, unless ``keep_buffers`` (they were built with it).
    """
    check_applicable(optimizer, action)
    for index, group in enumerate(optimizer.param_groups):
        factor = 1.0
        if action.momentum is not None:
            if action.compensate_lr:
                factor *= (1 - action.momentum) / (1 - group["momentum"])
            group["momentum"] = action.momentum
            for key in ("base_momentum", "max_momentum"):  # OneCycleLR(cycle_momentum=True)
                if key in group:
                    group[key] = action.momentum
            for scheduler in _schedulers_of(optimizer, schedulers):  # CyclicLR(cycle_momentum=True)
                for key in ("base_momentums", "max_momentums"):
                    if isinstance(getattr(scheduler, key, None), list):
                        getattr(scheduler, key)[index] = action.momentum
            for param in group["params"] if not keep_buffers else ():
                optimizer.state.get(param, {}).pop("momentum_buffer", None)
        if action.nesterov is not None:
            group["nesterov"] = action.nesterov
        if action.eps is not None:
            group["eps"] = action.eps
        if action.lr_factor is not None:
            factor *= action.lr_factor
        if factor != 1.0 and float(group["lr"]) > 0:  # an lr of 0 (a warm-up's first step) stays 0
            new_lr = float(group["lr"]) * factor
            if action.max_lr is not None:  # a cap: a raise never lowers an lr already above it
                new_lr = max(min(new_lr, action.max_lr), min(float(group["lr"]), new_lr))
            factor = new_lr / float(group["lr"])
            group["lr"] = new_lr if not isinstance(group["lr"], torch.Tensor) else group["lr"].fill_(new_lr)
            for key in ("initial_lr", "max_lr", "min_lr"):  # max_lr, min_lr: OneCycleLR's
                if key in group:
                    group[key] *= factor
            for scheduler in _schedulers_of(optimizer, schedulers):
                for key in ("base_lrs", "max_lrs"):  # max_lrs: CyclicLR's
                    if isinstance(getattr(scheduler, key, None), list):
                        getattr(scheduler, key)[index] *= factor
    fill_momentum_buffers(optimizer)
    return {
        "lr": [float(group["lr"]) for group in optimizer.param_groups],
        "momentum": [float(group.get("momentum", 0.0)) for group in optimizer.param_groups],
    }


def fill_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Give RMSprop a zero momentum buffer where its momentum is on and a param's state has none: it
    creates one at a param's first step only, with momentum on then, and fails without it (a KeyError)
    where momentum was set, or put back by a rollback, after that."""
    if isinstance(optimizer, torch.optim.RMSprop):
        for group in optimizer.param_groups:
            for param in group["params"] if group["momentum"] > 0 else ():
                state = optimizer.state.get(param)
                if state and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


class LayerwiseSteps:
    """Layer-wise steps, on any optimizer: SGD's gradients scaled before its step (:func:`trust_ratio_`),
    any other optimizer's step rescaled after it (:func:`starts_of`, :func:`trust_update_`), for each of
    ``layers`` (:func:`~.grad_flow.parameter_layers` of the model, set at fit start)."""

    def __init__(self) -> None:
        self.layers: dict[str, list[torch.nn.Parameter]] = {}
        self._before: dict[int, torch.Tensor] | None = None  # the parameters before a non-SGD step

    def before_step(self, optimizer: torch.optim.Optimizer, ratio: float, clipped: bool = False) -> None:
        """Where the gradients are final (Lightning: ``on_before_optimizer_step``), but for a clip still to
        come (``clipped``: Lightning's ``gradient_clip_val`` clips them after that hook, and would clip SGD's
        scaled gradients back: its step is then set as it is taken, as any other optimizer's)."""
        if steps_on_gradients(optimizer) and not clipped:
            trust_ratio_(self.layers, optimizer, ratio)
        elif self._before is None:
            self._before = starts_of(self.layers, optimizer)

    def after_step(self, ratio: float) -> None:
        """Once the step is taken (Lightning: ``on_train_batch_end``)."""
        if self._before is not None:
            trust_update_(self.layers, self._before, ratio)
            self._before = None


@torch.no_grad()
def trust_ratio_(layers: dict[str, list[torch.nn.Parameter]], optimizer: torch.optim.Optimizer, ratio: float) -> None:
    """Scale each layer's gradients in place so that its SGD step ``lr * grad`` has the norm
    ``ratio * |[W, b]|``: both norms are taken over all the layer's parameters (weight and bias
    together; a bias scaled by the weight's ratio alone takes a huge step where the weight's
    gradient is tiny, and blew deep ReLU nets up). Layers without a weight matrix, or with a zero
    norm or gradient, are left alone. Call it where the gradients are final for the step
    (Lightning: ``on_before_optimizer_step``); under DDP they are already reduced, so every rank
    scales alike. No host sync: all layers' norms and scales are a few fused kernels per device.
    """
    lrs = {id(param): float(group["lr"]) for group in optimizer.param_groups for param in group["params"]}
    by_device: dict[torch.device, list[tuple[list[torch.nn.Parameter], float]]] = {}
    for params in layers.values():
        params = [p for p in params if p.grad is not None and id(p) in lrs]
        if any(p.ndim >= 2 for p in params) and lrs[id(params[0])] > 0:
            by_device.setdefault(params[0].device, []).append((params, lrs[id(params[0])]))
    for kept in by_device.values():
        _scale_layers(kept, ratio)


@torch.no_grad()
def starts_of(layers: dict[str, list[torch.nn.Parameter]], optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """Each parameter's value before ``optimizer``'s step, by ``id``, with the step's decoupled weight
    decay taken already (AdamW's ``W * (1 - lr * weight_decay)``), for :func:`trust_update_`: it
    rescales the step the gradients drive, not the decay. Where gradients vanish, Adam's step is
    ~``grad / eps``, far below AdamW's decay: rescaled with it, a layer-wise step only shrank each
    layer by ``ratio`` (the stall zoo's depth-18 sigmoid net under AdamW: 2 of 9 seeds sat at 0.693
    through 1770 epochs of them; with the decay apart, 7 of 9 are out within 200, as under Adam)."""
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    decay = {
        id(p): float(group["lr"]) * group["weight_decay"]
        for group in optimizer.param_groups
        if group.get("weight_decay") and group.get("decoupled_weight_decay", decoupled)
        for p in group["params"]
    }
    return {
        id(p): p.detach() * (1 - decay[id(p)]) if id(p) in decay else p.detach().clone()
        for params in layers.values()
        for p in params
    }


@torch.no_grad()
def trust_update_(layers: dict[str, list[torch.nn.Parameter]], before: dict[int, torch.Tensor], ratio: float) -> None:
    """After any optimizer's step: rescale each layer's step ``W - W_before`` (weight and bias
    together) to the norm ``ratio * |[W_before, b_before]|``, the LAMB-style trust ratio on the
    update the optimizer actually took (Adam's step does not scale with the gradient, so scaling
    the gradient, as :func:`trust_ratio_` does for SGD, would change nothing). ``before`` holds each
    parameter's value before the step, by ``id``. Layers without a weight matrix, or with a zero
    norm or step, are left alone."""
    for params in layers.values():
        params = [p for p in params if id(p) in before]
        if not any(p.ndim >= 2 for p in params):
            continue
        old = [before[id(p)] for p in params]
        steps = torch._foreach_sub([p.detach() for p in params], old)
        size = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old)))
        step = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(steps)))
        scale = torch.where((size > 0) & (step > 0), ratio * size / step, torch.ones_like(step))
        for param, start, delta in zip(params, old, steps, strict=True):
            param.copy_(start + scale.to(delta.dtype) * delta)


def _scale_layers(kept: list[tuple[list[torch.nn.Parameter], float]], ratio: float) -> None:
    """:func:`trust_ratio_` for layers on one device. Each parameter's norm comes from one
    ``torch._foreach_norm`` (as ``clip_grad_norm_`` takes them); a layer's norm is the norm of its
    parameters' norms, one row per layer (rows of unequal length padded with zeros): the same
    values, bit for bit, as one layer at a time."""
    params = [p for layer, _ in kept for p in layer]
    grads = [p.grad for p in params]
    sizes = [len(layer) for layer, _ in kept]
    width = max(sizes)
    ragged = any(size != width for size in sizes)

    def layer_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
        norms = torch.stack(torch._foreach_norm(tensors))
        if ragged:
            slots = [row * width + i for row, size in enumerate(sizes) for i in range(size)]
            norms = norms.new_zeros(len(sizes) * width).index_copy_(0, torch.tensor(slots, device=norms.device), norms)
        return torch.linalg.vector_norm(norms.view(len(sizes), width), dim=1)

    norm, grad_norm = layer_norms(params), layer_norms(grads)
    lrs = [lr for _, lr in kept]
    lr = lrs[0] if len(set(lrs)) == 1 else torch.tensor(lrs, dtype=grad_norm.dtype, device=grad_norm.device)
    scale = torch.where((norm > 0) & (grad_norm > 0), ratio * norm / (lr * grad_norm), torch.ones_like(grad_norm))
    repeats = torch.tensor(sizes, device=scale.device) if ragged else width
    scales = scale.repeat_interleave(repeats, output_size=len(params)).unbind()
    torch._foreach_mul_(grads, [s if s.dtype == g.dtype else s.to(g.dtype) for s, g in zip(scales, grads, strict=True)])
