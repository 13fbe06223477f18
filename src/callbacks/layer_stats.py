"""What each layer does: its activations (mean, std, saturated or dead share), and how far one optimizer
step moved its weights. Torch only, no Lightning.

A layer is a ``Linear`` or ``Conv`` module with a trainable weight, named as
:func:`~.grad_flow.parameter_layers` names it (``layers.0``). Its activation is the activation module
that is called next after it in the forward pass, before the next layer: found by the order of the
calls, so one activation module shared by every layer (as ``MLP`` has), a ``Sequential`` and a norm
layer in between all work. A layer followed by no activation module (the output layer, or a
functional ``F.relu`` in ``forward``) gets the mean and std of its own output, and no saturated or
dead share: a functional activation is not seen.

- **Saturated share** (bounded activations: sigmoid, tanh, hardtanh, hardsigmoid, softsign, relu6):
  the share of the batch's outputs within ``margin`` of a bound, ``margin`` being a fraction of the
  half-range: ``margin=0.03`` is ``|tanh| > 0.97`` (Karpathy's "makemore part 3") and a sigmoid
  below 0.015 or above 0.985. At a bound the derivative is ~0: the gradient stops there.
- **Dead share** (the ReLU family: relu, leaky relu, elu, selu, celu, gelu, silu, mish, prelu,
  rrelu): the share of units (features, or channels of a conv) with no positive output on any
  sample of the batch: for ReLU no gradient at all, for the others only the small negative-regime slope.
- **Update ratio**: ``||W_after - W_before|| / ||W_before||`` of the weight over the optimizer step
  actually taken, whatever the optimizer (log10 of it is what is logged; ~-3 is Karpathy's healthy
  rate), and the **gradient-to-weight ratio** ``||grad W|| / ||W||`` at that step.

All statistics are computed in float32 on the device and copied to the host once per recorded step.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .grad_flow import Reading, layer_modules

LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
RELU_FAMILY = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.PReLU, nn.RReLU)
BOUNDED = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)  # nn.ReLU6 is a Hardtanh
ACTIVATIONS = (*RELU_FAMILY, *BOUNDED)
HISTOGRAM_SAMPLES = 4096  # at most this many values of a tensor go into one histogram


def bounds(activation: nn.Module) -> tuple[float, float] | None:
    """The range of a bounded activation's output, ``None`` for an unbounded one.

    >>> bounds(nn.Tanh()), bounds(nn.ReLU6()), bounds(nn.ReLU())
    ((-1.0, 1.0), (0.0, 6.0), None)
    """
    if isinstance(activation, nn.Hardtanh):
        return float(activation.min_val), float(activation.max_val)
    if isinstance(activation, (nn.Tanh, nn.Softsign)):
        return -1.0, 1.0
    if isinstance(activation, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    return None


def saturated_share(output: torch.Tensor, low: float, high: float, margin: float) -> torch.Tensor:
    """The share of ``output`` within ``margin`` (a fraction of the half-range) of ``low`` or ``high``.

    >>> float(saturated_share(torch.tensor([-0.99, -0.5, 0.0, 0.98]), -1.0, 1.0, 0.03))
    0.5
    """
    edge = margin * (high - low) / 2
    y = output.float()
    return ((y - low < edge) | (high - y < edge)).float().mean()


def dead_share(output: torch.Tensor) -> torch.Tensor:
    """The share of units (dim 1: features, or a conv's channels) with no positive output anywhere in
    the batch.

    >>> round(float(dead_share(torch.tensor([[0.0, 1.0, -0.1], [0.0, 0.0, -0.2]]))), 4)  # units 0 and 2
    0.6667
    """
    y = output.float()
    units = y.transpose(0, 1).reshape(y.shape[1], -1) if y.ndim > 1 else y.reshape(1, -1)
    return (~(units > 0).any(dim=1)).float().mean()


def sample(tensor: torch.Tensor, limit: int = HISTOGRAM_SAMPLES) -> torch.Tensor:
    """At most ``limit`` evenly spaced values of ``tensor``, flat, float32, detached (for a histogram)."""
    flat = tensor.detach().float().flatten()
    return flat if flat.numel() <= limit else flat[:: math.ceil(flat.numel() / limit)]


@dataclass(frozen=True)
class Histogram:
    """A histogram as TensorBoard's ``add_histogram_raw`` takes it (``bucket_limits``: right edges)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


def histogram(values: torch.Tensor, bins: int = 30) -> Histogram:
    """``values`` in ``bins`` equal buckets, counted on their device (``torch.histc``): cheaper than
    TensorBoard's own ``add_histogram`` (numpy, ~1500 buckets), which cost 13% of a toy run.

    >>> h = histogram(torch.tensor([0.0, 1.0, 1.0, 3.0]), bins=3)
    >>> h.bucket_limits, h.bucket_counts, h.num
    ([1.0, 2.0, 3.0], [1.0, 2.0, 1.0], 4)
    """
    x = values.detach().float().flatten()
    low, high, total, squares = torch.stack([x.min(), x.max(), x.sum(), (x * x).sum()]).tolist()
    if high <= low:  # one value: one bucket around it
        return Histogram(low, high, x.numel(), total, squares, [high + 1e-12], [float(x.numel())])
    counts = torch.histc(x, bins, low, high).tolist()
    limits = torch.linspace(low, high, bins + 1)[1:].tolist()
    return Histogram(low, high, x.numel(), total, squares, limits, counts)


@dataclass(frozen=True)
class LayerStats:
    """One layer at one recorded step; ``None`` where the statistic does not apply or was not seen."""

    act_mean: float
    act_std: float
    saturated: float | None = None
    dead: float | None = None
    update_ratio: float | None = None
    grad_to_weight: float | None = None


class LayerStatistics:
    """Records every layer's :class:`LayerStats` at the steps it is asked to, with forward hooks that
    exist only during those steps' forward pass (no cost on the other steps).

    Per recorded step: :meth:`arm` before the forward, :meth:`before_step` once the gradients are
    final (before the optimizer step), :meth:`finish` after the step; each does its work once a step,
    however many readers call it (:func:`shared_statistics`). ``latest`` holds the last
    step's statistics by layer, ``samples`` (with ``keep_samples``)
    value samples of each layer's activations, gradients and weights for histograms.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> stats = LayerStatistics()
    >>> stats.arm(net, step=0)
    >>> loss = net(torch.ones(4, 2)).sum()
    >>> loss.backward()
    >>> stats.before_step(net)
    >>> sorted(stats.finish(net))
    ['0', '2']
    """

    def __init__(self, margin: float = 0.03) -> None:
        if not 0 < margin < 1:
            raise ValueError(f"margin must be in (0, 1), got {margin}")
        self.margin = margin
        self.latest: dict[str, LayerStats] = {}
        self.samples: dict[str, dict[str, torch.Tensor]] = {}
        self.keep_samples = False
        self.step: int | None = None  # the step armed, until it is finished
        self.finished_step: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._layers: dict[str, nn.Module] = {}
        self._outputs: dict[str, torch.Tensor] = {}  # each layer's output, until its activation is seen
        self._found: dict[str, list[torch.Tensor]] = {}  # per layer: mean, std, saturated, dead (on the device)
        self._last: str | None = None
        self._before: dict[str, torch.Tensor] = {}
        self._grad_norms: dict[str, torch.Tensor] = {}

    def arm(self, module: nn.Module, step: int) -> None:
        """Hook the layers and activations of ``module`` for this step's forward pass."""
        if self.step == step or self.finished_step == step:
            return
        self.disarm()
        self.step = step
        self._layers = {name: m for name, m in layer_modules(module).items()
                        if isinstance(m, LAYER_TYPES) and m.weight.requires_grad}  # fmt: skip
        names = {id(m): name for name, m in self._layers.items()}
        for m in module.modules():
            if id(m) in names:
                self._handles.append(m.register_forward_hook(self._layer_hook(names[id(m)])))
            elif isinstance(m, ACTIVATIONS):
                self._handles.append(m.register_forward_hook(self._activation_hook))

    def _layer_hook(self, name: str):
        def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if layer.training and name not in self._found:
                self._flush_last()  # the previous layer met no activation: its own output stands
                self._last, self._outputs[name] = name, output

        return hook

    def _activation_hook(self, activation: nn.Module, args: tuple, output: torch.Tensor) -> None:
        name, self._last = self._last, None
        if name is None or name in self._found:  # an activation not right after a layer
            return
        self._outputs.pop(name, None)
        self._record(name, output, activation)

    def _flush_last(self) -> None:
        if self._last is not None and self._last in self._outputs:
            self._record(self._last, self._outputs.pop(self._last), None)
        self._last = None

    def _record(self, name: str, output: torch.Tensor, activation: nn.Module | None) -> None:
        y = output.detach().float()
        nan = torch.tensor(math.nan, device=y.device)
        limits = bounds(activation) if activation is not None else None
        saturated = saturated_share(y, *limits, self.margin) if limits else nan
        dead = dead_share(y) if isinstance(activation, RELU_FAMILY) and y.ndim > 1 else nan
        self._found[name] = [y.mean(), y.std() if y.numel() > 1 else nan, saturated, dead]
        if self.keep_samples:
            self.samples.setdefault(name, {})["activation"] = sample(y)

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def before_step(self, module: nn.Module, reading: Reading | None = None) -> None:
        """Once the gradients are final: keep each layer's weight (to measure the step) and its gradient
        norm, from ``reading`` (this step's :class:`~.grad_flow.GradientPass` reading, with one
        optimizer) or, without one, computed here."""
        if self.step is None or self._before:
            return
        grad_norms = None
        if reading is not None and reading.profile is not None and reading.index is None:
            grad_norms = {name.removesuffix(".weight"): v for name, v in reading.recorder.param_norms.items()}
        self._flush_last()
        self.disarm()
        weights = [m.weight for m in self._layers.values()]
        self._before = {name: w.detach().clone() for name, w in zip(self._layers, weights, strict=True)}
        if grad_norms is not None:
            self._grad_norms = {name: torch.tensor(grad_norms[name]) for name in self._layers if name in grad_norms}
        else:
            grads = [w.grad if w.grad is not None else torch.zeros(1, device=w.device) for w in weights]
            norms = torch._foreach_norm([g.float() for g in grads]) if grads else []
            self._grad_norms = dict(zip(self._layers, norms, strict=True))
        if self.keep_samples:
            for name, w in zip(self._layers, weights, strict=True):
                entry = self.samples.setdefault(name, {})
                entry["weight"] = sample(w)
                if w.grad is not None:
                    entry["gradient"] = sample(w.grad)

    def finish(self, module: nn.Module, reduce=None) -> dict[str, LayerStats]:
        """After the optimizer step: the step's statistics by layer (also ``latest``).

        ``reduce`` (a tensor -> tensor mean over processes, under DDP) averages the activation
        statistics over the ranks; it is called once, on every rank alike."""
        if self.step is None:
            return self.latest if self.finished_step is not None else {}
        self._flush_last()
        self.disarm()
        names = [n for n in self._layers if n in self._found and n in self._before]
        if not names:
            self.step, self._found, self._before, self._outputs = None, {}, {}, {}
            return {}
        after = [self._layers[n].weight.detach() for n in names]
        before = [self._before[n] for n in names]
        deltas = torch._foreach_norm(torch._foreach_sub(after, before))
        sizes = torch._foreach_norm(before)
        device = after[0].device
        rows = []
        for name, delta, size in zip(names, deltas, sizes, strict=True):
            grad = torch.as_tensor(self._grad_norms.get(name, math.nan), device=device, dtype=torch.float32)
            found = [t.to(device=device, dtype=torch.float32) for t in self._found[name]]
            rows.append(torch.stack([*found, (delta / size).float(), (grad / size).float()]))
        table = torch.stack(rows)
        if reduce is not None:
            table = reduce(table)
        stats = {}
        for name, (mean, std, saturated, dead, update, grad) in zip(names, table.tolist(), strict=True):
            stats[name] = LayerStats(mean, std, _value(saturated), _value(dead), _value(update), _value(grad))
        self.step, self.finished_step = None, self.step
        self._found, self._before, self._outputs = {}, {}, {}
        self.latest = stats
        return stats


def _value(x: float) -> float | None:
    return None if math.isnan(x) else x


_SHARED: weakref.WeakKeyDictionary[object, dict[float, LayerStatistics]] = weakref.WeakKeyDictionary()


def shared_statistics(owner: object, margin: float = 0.03) -> LayerStatistics:
    """The one :class:`LayerStatistics` of ``owner`` (a Trainer) for this margin: the monitor and the
    detector of a trainer record each step once, together."""
    return _SHARED.setdefault(owner, {}).setdefault(float(margin), LayerStatistics(margin))
