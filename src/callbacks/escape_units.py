"""Re-placing the units a stall names, as :class:`~.escape.PlateauEscape` does it on a Lightning run."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from .layer_monitor import mean_over_ranks
from .units import next_linear, replace_idle_units


def replace_stall_units(
    trainer: L.Trainer, pl_module: L.LightningModule, detector: Any, units: dict[str, dict[str, list]] | None,
    weakest: bool = False, stale: bool = False,
) -> str:  # fmt: skip
    """Re-place the units a stall event names (``units``, as the ``detector`` found them): idle
    ReLU units (:func:`~.units.replace_idle_units`) and pinned units of a bounded activation
    (:meth:`~.saturated.PinnedUnits.replace`), or (``weakest``) each layer's weakest unit; the same
    new weights on every rank (rank 0's: each rank put the kinks on its own data). Returns what was
    re-placed, as the event records it (``": none found"`` when nothing was). ``stale``: the weights
    were rolled back since the units were found; the pinned ones are found again (idle ReLU units are
    counted over an epoch: a re-placed unit that died again is dead on either weights). Units of a frozen
    layer, or read by one (not trained: ``requires_grad`` off, or in no optimizer), are left alone."""
    broadcast = (lambda t: trainer.strategy.broadcast(t, src=0)) if trainer.world_size > 1 else None
    optimizers, generator = trainer.optimizers, torch.Generator().manual_seed(trainer.global_step)
    units, pinned = units or {}, detector.pinned
    if stale:  # pinned units found on weights rolled back since: found again (the re-placed ones were live there)
        units = {name: {k: v for k, v in found.items() if k != "saturated"} for name, found in units.items()}
        for name, found in pinned.find(mean_over_ranks(trainer)).items():
            units.setdefault(name, {})["saturated"] = found
    units = {name: found for name, found in units.items() if trained(pl_module, name, optimizers)}
    if weakest:
        chosen = pinned.weakest(mean_over_ranks(trainer))
        chosen = {name: found for name, found in chosen.items() if trained(pl_module, name, optimizers)}
        replaced = pinned.replace(chosen, optimizers, generator, broadcast)
    else:
        replaced = replace_idle_units(detector.units, pl_module, units, optimizers, generator, broadcast)
        saturated = {name: found["saturated"] for name, found in units.items() if found.get("saturated")}
        replaced += pinned.replace(saturated, optimizers, generator, broadcast)
    return f": {', '.join(replaced)}" if replaced else ": none found"


def trained(module: torch.nn.Module, name: str, optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether the Linear ``name`` of ``module`` and the one that reads its units are trained: their weights
    need a gradient and are in an optimizer (where any is given)."""
    stepped = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    layers = (module.get_submodule(name), next_linear(module, name))
    return all(m is not None and m.weight.requires_grad and (not stepped or id(m.weight) in stepped) for m in layers)
