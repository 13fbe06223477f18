"""ReLU units that do nothing, found and re-placed: torch only, no Lightning.

A ReLU unit is *dead* when its pre-activation is negative on every training sample (output and
gradient are 0: it never learns again), *always on* when it is positive on every sample (its kink
lies outside the data, so it adds no nonlinearity), and *redundant* with another unit of its layer
when both have the same kink and sign (their rows ``[w, b]`` point the same way). A net of a few
ReLU units that settles with one of these is in a minimum that no optimizer setting gets it out of
(the dnnex fit); re-placing the unit does.

:class:`UnitRecorder` counts, per unit, the training samples on which it was active, with forward
hooks; :func:`idle_units` turns counts and weights into the three lists; :func:`replace_units`
gives units new incoming weights with the kink at a training point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

RELU_FAMILY = (nn.ReLU, nn.ReLU6)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def unit_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers whose outputs are ReLU units: every one but the last, in registration
    order, when ``module`` has a ReLU-family activation and no normalisation layer (which would sit
    between a Linear and its ReLU); otherwise none. This is the layout of an MLP (Linear, ReLU, ...,
    Linear); other layouts get no unit diagnosis.

    >>> unit_layers(nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))).keys()
    dict_keys(['0'])
    >>> unit_layers(nn.Sequential(nn.Linear(1, 2), nn.Sigmoid(), nn.Linear(2, 1)))
    {}
    """
    modules = list(module.named_modules())
    if not any(isinstance(m, RELU_FAMILY) for _, m in modules) or any(isinstance(m, NORMS) for _, m in modules):
        return {}
    linears = [(name, m) for name, m in modules if isinstance(m, nn.Linear)]
    return dict(linears[:-1])


def next_linear(module: nn.Module, name: str) -> nn.Linear | None:
    """The ``nn.Linear`` registered after the one called ``name`` (the layer that reads its units)."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n, _ in linears]
    index = names.index(name)
    return linears[index + 1][1] if index + 1 < len(linears) else None


class UnitRecorder:
    """Counts, for each ReLU unit of a module, the training samples on which it was active.

    :meth:`bind` hooks the module's unit layers (see :func:`unit_layers`); in training mode each
    forward adds to ``active[layer]`` (a count per unit) and ``samples[layer]``, and keeps the
    layer's latest inputs (at most ``keep_inputs`` rows): the points a re-placed unit's kink is put
    on. :meth:`reset` starts a new count (Lightning: each training epoch).
    """

    def __init__(self, keep_inputs: int = 256) -> None:
        self.keep_inputs = keep_inputs
        self.layers: dict[str, nn.Linear] = {}
        self.active: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def bind(self, module: nn.Module) -> None:
        self.close()
        self.layers = unit_layers(module)
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        self.reset()

    def _hook(self, name: str):
        def hook(layer: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not layer.training or not torch.is_grad_enabled():
                return
            pre = output.detach().reshape(-1, output.shape[-1])
            counts = (pre > 0).sum(0)
            self.active[name] = counts if name not in self.active else self.active[name] + counts
            self.samples[name] = self.samples.get(name, 0) + pre.shape[0]
            self.inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])[-self.keep_inputs :]

        return hook

    def reset(self) -> None:
        self.active, self.samples = {}, {}

    def idle(self, trainer: Any, same_kink: float = 0.999) -> dict[str, dict[str, list]]:
        """Per layer, its dead, always-on and redundant units (:func:`idle_units`) since the last
        :meth:`reset` (layers with none left out). Counts are summed over the processes of
        ``trainer`` (a Lightning Trainer), so every rank finds the same units."""
        found = {}
        for name, layer in self.layers.items():
            if name not in self.active:
                continue
            active = self.active[name].float()
            samples = torch.tensor(float(self.samples[name]), device=active.device)
            if trainer.world_size > 1:
                active = trainer.strategy.reduce(active, reduce_op="sum")
                samples = trainer.strategy.reduce(samples, reduce_op="sum")
            rows = layer.weight.detach()
            if layer.bias is not None:
                rows = torch.cat([rows, layer.bias.detach()[:, None]], dim=1)
            units = idle_units(
                [int(n) for n in active.tolist()], int(samples.item()), rows.tolist(), same_kink=same_kink
            )
            if any(units.values()):
                found[name] = units
        return found

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def idle_units(
    active: Sequence[int], samples: int, rows: Sequence[Sequence[float]], same_kink: float = 0.999
) -> dict[str, list]:
    """The dead, always-on and redundant units of one layer.

    ``active[j]`` is on how many of ``samples`` samples unit ``j`` was active; ``rows[j]`` its
    incoming weights and bias. A pair is redundant when both units are live and the cosine of
    their rows is above ``same_kink``; the second unit of each pair is listed to be re-placed.

    >>> idle_units([0, 10, 4, 4], 10, [[1, 0], [1, 2], [1, -0.5], [2, -1.0]])
    {'dead': [0], 'always_on': [1], 'redundant': [[2, 3]]}
    """
    dead = [j for j, n in enumerate(active) if n == 0]
    always_on = [j for j, n in enumerate(active) if samples > 0 and n == samples]
    live = [j for j in range(len(active)) if j not in dead]
    norms = {j: math.sqrt(sum(v * v for v in rows[j])) for j in live}
    redundant, taken = [], set(dead) | set(always_on)
    for a_i, a in enumerate(live):
        for b in live[a_i + 1 :]:
            if a in taken or b in taken or norms[a] == 0 or norms[b] == 0:
                continue
            cosine = sum(x * y for x, y in zip(rows[a], rows[b], strict=True)) / (norms[a] * norms[b])
            if cosine > same_kink:
                redundant.append([a, b])
                taken.add(b)
    return {"dead": dead, "always_on": always_on, "redundant": redundant}


@torch.no_grad()
def replace_units(
    layer: nn.Linear,
    reader: nn.Linear | None,
    units: Sequence[int],
    inputs: torch.Tensor,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] = (),
    generator: torch.Generator | None = None,
) -> None:
    """Give ``units`` of ``layer`` new incoming weights with their kink at a random row of ``inputs``.

    Each new row has a random direction and the mean norm of the layer's other rows; its bias puts
    the kink (pre-activation 0) on a training point, so the unit is active on part of the data. The
    outgoing weights (``reader``'s columns) are kept. The optimizer's per-parameter state for those
    rows and columns (Adam's moments, SGD's momentum) is zeroed: the old unit's history does not
    apply to the new one. Where ``inputs`` are all one point (its predecessor was dead), the
    new kinks are all there too: re-place layers from the input on (see ``PlateauEscape``).
    """
    if not units:
        return
    units = list(units)
    weight = layer.weight
    keep = [j for j in range(weight.shape[0]) if j not in units]
    scale = weight[keep].norm(dim=1).mean() if keep else weight.norm(dim=1).mean()
    if not scale > 0:
        scale = torch.tensor(1.0 / math.sqrt(weight.shape[1]))
    direction = torch.randn(len(units), weight.shape[1], generator=generator, dtype=torch.float32)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = (direction * scale.float().cpu()).to(weight)
    points = inputs[torch.randint(len(inputs), (len(units),), generator=generator).to(inputs.device)].to(weight)
    weight[units] = rows
    if layer.bias is not None:
        layer.bias[units] = -(rows * points).sum(1)
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    slices = [(weight, (units,)), (layer.bias, (units,))]
    if reader is not None:
        slices.append((reader.weight, (slice(None), units)))
    for param, index in slices:
        if param is None:
            continue
        for optimizer in optimizers:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value[index] = 0


def replace_idle_units(
    recorder: UnitRecorder,
    module: nn.Module,
    found_units: dict[str, dict[str, list]],
    optimizers: Sequence[torch.optim.Optimizer],
    generator: torch.Generator,
    broadcast=None,
) -> list[str]:
    """Re-place the units ``found_units`` names (per layer: ``dead``, ``always_on``, ``redundant``
    pairs), layer by layer from the input: a layer's new kinks go on the points its (already mended)
    predecessor now gives it, so a run of dead layers comes back in one action. ``broadcast`` (a
    tensor -> tensor from rank 0, under DDP) makes every rank take the same new weights. Returns
    ``"<layer> [units]"`` for each layer changed."""
    replaced, inputs = [], None
    for name, layer in recorder.layers.items():
        if inputs is None:
            inputs = recorder.inputs.get(name)
        if inputs is None:
            break
        found = found_units.get(name)
        units = sorted({*found["dead"], *found["always_on"], *(p[1] for p in found["redundant"])}) if found else []
        if units:
            replace_units(layer, next_linear(module, name), units, inputs, optimizers, generator)
            if broadcast is not None:
                for param in (layer.weight, layer.bias):
                    if param is not None:
                        param.data.copy_(broadcast(param.data))
            replaced.append(f"{name} {units}")
        with torch.no_grad():  # what the next unit layer reads (the Linear-ReLU layout of unit_layers)
            inputs = torch.relu(layer(inputs))
    return replaced
