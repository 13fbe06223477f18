"""Units that give the next layer little, found and re-placed: torch only.

A sigmoid unit whose pre-activation is large on every sample outputs a constant (~0 or ~1) with a
derivative of ~0: it neither learns nor tells the next layer anything, it is a bias. A deep sigmoid
net pushed by large steps pins whole layers (gradients exactly 0). No step on the gradient moves
such a unit; re-placing it does, as re-placing a dead ReLU unit does (:mod:`.units`), with ReDo's
rule for the outgoing weights (Sokar et al. 2023): they are set to 0, and what the unit gave the
next layer (its mean output times those weights) goes into the next layer's bias, so the net
computes what it did before, up to the unit's spread, and the new unit joins in as its outgoing
weights grow.

A local minimum needs no pinned unit. The source lab's XOR net (2-2-1 sigmoid, SGD lr 1.0) ends at
loss 0.347 with both hidden units at 1.0 on (1, 0) and (1, 1): the two points of different labels
look the same to the output, which gives each 0.5. Re-placing either unit (the weakest, with
:meth:`~PinnedUnits.weakest`) got all 6 stuck seeds of 40 out, in 3 draws each (36 of 36, loss
0.003 after 3000 more epochs; more SGD, Adam, and shrink-and-perturb by 0.2 or 0.5: 0 of 6).

:class:`PinnedUnits` keeps the latest training inputs of an MLP's first layer (one forward hook);
:meth:`~PinnedUnits.find` runs them through the net's hidden layers to find the pinned units,
:meth:`~PinnedUnits.weakest` the weakest unit of each layer, and :meth:`~PinnedUnits.replace`
re-places units, layer by layer from the input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .layer_stats import bounds
from .units import NORMS

Reduce = Callable[[torch.Tensor], torch.Tensor]


def plain_mlp(module: nn.Module) -> tuple[dict[str, nn.Linear], nn.Module] | None:
    """The hidden ``nn.Linear`` layers of an MLP and its activation: every Linear but the last, in
    registration order, when ``module`` has one kind of activation module (``torch.nn``'s) and no
    normalisation layer (the ``Linear, act, ..., Linear`` layout); otherwise ``None``.

    >>> layers, act = plain_mlp(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    >>> list(layers), type(act).__name__
    (['0'], 'ReLU')
    >>> plain_mlp(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))) is None
    True
    """
    modules = list(module.named_modules())
    activations = [m for _, m in modules if type(m).__module__ == nn.modules.activation.__name__]
    if not activations or len({type(m) for m in activations}) > 1 or any(isinstance(m, NORMS) for _, m in modules):
        return None
    linears = [(name, m) for name, m in modules if isinstance(m, nn.Linear)]
    return (dict(linears[:-1]), activations[0]) if len(linears) > 1 else None


class PinnedUnits:
    """Finds the pinned units of a bounded-activation MLP, and the weakest units of any plain MLP
    (:func:`plain_mlp`), and re-places them (see the module docstring).

    Args:
        margin: A unit's output within this fraction of the half-range from a bound is saturated
            (as in :class:`~.layer_stats.LayerStatistics`: 0.03 is ``|tanh| > 0.97``).
        share: A unit saturated on at least this share of the kept inputs is pinned.
        keep_inputs: How many of the latest training inputs are kept.
    """

    def __init__(self, margin: float = 0.03, share: float = 0.9, keep_inputs: int = 256) -> None:
        self.margin, self.share, self.keep_inputs = margin, share, keep_inputs
        self.layers: dict[str, nn.Linear] = {}
        self.readers: dict[str, nn.Linear] = {}
        self.activation: nn.Module | None = None
        self.inputs: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._every_step = False

    def bind(self, module: nn.Module) -> None:
        """Hook ``module``'s first layer, if it is a plain MLP (:func:`plain_mlp`; otherwise nothing is
        found). Only a bounded activation has pinned units (looked for at every stall: its inputs
        are kept at every training step); any has a weakest one (its inputs are kept at the next
        training step, and then at each step :meth:`arm` is called before: a hook on every step
        would cost a small net ~3% of its step for a remedy used rarely)."""
        self.close()
        found = plain_mlp(module)
        if found is None:
            return
        self.layers, self.activation = found
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        self.readers = {name: linears[linears.index(layer) + 1] for name, layer in self.layers.items()}
        self._every_step = bounds(self.activation) is not None
        self.arm()

    def arm(self) -> None:
        """Keep the inputs of the next training step (bound to an MLP and not hooked already)."""
        if self.layers and self._handle is None:
            self._handle = next(iter(self.layers.values())).register_forward_pre_hook(self._keep)

    def _keep(self, layer: nn.Module, args: tuple) -> None:
        if layer.training and torch.is_grad_enabled():
            self.inputs = args[0].detach().reshape(-1, args[0].shape[-1])[-self.keep_inputs :]
            if not self._every_step and self._handle is not None:
                self._handle.remove()
                self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.inputs, self.layers = None, None, {}

    @torch.no_grad()
    def find(self, reduce: Reduce | None = None, share: float | None = None) -> dict[str, list[int]]:
        """Per layer, the units saturated on at least ``share`` (by default the one given at
        construction) of the kept inputs (layers with none left out). ``reduce`` (a mean over
        processes, under DDP) makes every rank find the same units."""
        share = self.share if share is None else share
        if self.inputs is None or self.activation is None or bounds(self.activation) is None:
            return {}
        low, high = bounds(self.activation)
        edge = self.margin * (high - low) / 2
        x, found = self.inputs, {}
        for name, layer in self.layers.items():
            x = self.activation(layer(x.to(layer.weight)))
            shares = ((x - low < edge) | (high - x < edge)).float().mean(0)
            if reduce is not None:
                shares = reduce(shares)
            units = [j for j, s in enumerate(shares.tolist()) if s >= share]
            if units:
                found[name] = units
        return found

    @torch.no_grad()
    def weakest(self, reduce: Reduce | None = None) -> dict[str, list[int]]:
        """Per hidden layer, the unit the next layer gets least from: the smallest spread (std) of its
        output over the kept inputs times the norm of its outgoing weights (Continual Backprop's
        contribution utility, Dohare et al. 2024, with the spread for the mean output, so that a
        constant unit counts as giving nothing). ``reduce`` as in :meth:`find`."""
        if self.inputs is None or self.activation is None:
            return {}
        x, found = self.inputs, {}
        for name, layer in self.layers.items():
            x = self.activation(layer(x.to(layer.weight)))
            utility = x.float().std(0, correction=0) * self.readers[name].weight.float().norm(dim=0)
            if reduce is not None:
                utility = reduce(utility)
            found[name] = [int(utility.argmin())]
        return found

    @torch.no_grad()
    def replace(
        self,
        units: Mapping[str, Sequence[int]],
        optimizers: Sequence[torch.optim.Optimizer] = (),
        generator: torch.Generator | None = None,
        broadcast: Reduce | None = None,
    ) -> list[str]:
        """Re-place ``units`` (per layer), from the input on: each new unit gets a random incoming
        direction, scaled so that its pre-activation has std 1 over the kept inputs and centred (0)
        on one of them, so it starts in the activation's live range; the pinned unit's mean output
        times its outgoing weights moves into the next layer's bias, and those weights become 0.
        The optimizer state of the changed rows and columns is zeroed. ``broadcast`` (rank 0's
        tensor to every rank, under DDP) makes every rank take the same weights. Returns
        ``"<layer> [units]"`` per layer changed."""
        if self.inputs is None or self.activation is None:
            return []
        x, replaced = self.inputs, []
        for name, layer in self.layers.items():
            x = x.to(layer.weight)
            chosen = list(units.get(name, ()))
            if chosen:
                self._replace_layer(layer, self.readers[name], chosen, x, optimizers, generator)
                if broadcast is not None:
                    for param in (layer.weight, layer.bias, self.readers[name].weight, self.readers[name].bias):
                        if param is not None:
                            param.data.copy_(broadcast(param.data))
                replaced.append(f"{name} {chosen}")
            x = self.activation(layer(x))
        return replaced

    def _replace_layer(
        self,
        layer: nn.Linear,
        reader: nn.Linear,
        units: list[int],
        x: torch.Tensor,
        optimizers: Sequence[torch.optim.Optimizer],
        generator: torch.Generator | None,
    ) -> None:
        old = self.activation(layer(x))[:, units].mean(0)
        direction = torch.randn(len(units), layer.weight.shape[1], generator=generator).to(layer.weight)
        spread = (x @ direction.T).std(0) if len(x) > 1 else direction.norm(dim=1)
        rows = direction / spread.clamp_min(1e-6)[:, None]
        points = x[torch.randint(len(x), (len(units),), generator=generator).to(x.device)]
        layer.weight[units] = rows
        if layer.bias is not None:
            layer.bias[units] = -(rows * points).sum(1)
        if reader.bias is not None:
            reader.bias += reader.weight[:, units] @ old
        reader.weight[:, units] = 0
        slices = [(layer.weight, (units,)), (layer.bias, (units,)), (reader.weight, (slice(None), units))]
        for param, index in slices:
            for optimizer in optimizers:
                for value in optimizer.state.get(param, {}).values() if param is not None else ():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value[index] = 0
