"""Per-layer gradient norms of a module: which parameters make a layer, their norms, a bounded history.

Torch only, no Lightning: :class:`GradNormRecorder` is owned by both
:class:`~.grad_norm.GradNormMonitor` (which logs what it records) and
:class:`~.plateau.PlateauDetector` (which diagnoses a stall from it).
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn


def parameter_layers(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The modules that own trainable parameters directly, in registration order, with those parameters.

    Shared leading name components are dropped, keeping the last two, so an MLP wrapped in a
    LightningModule as ``self.net`` reads ``layers.0, layers.1, ...`` rather than ``net.layers.0``.
    A parameter shared by two modules counts once, for the first that registers it.

    >>> list(parameter_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))))
    ['0', '2']
    """
    return {name: params for name, (_, params) in _layers(module).items()}


def layer_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The same layers as :func:`parameter_layers`, under the same names, as modules.

    >>> layer_modules(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    {'0': Linear(in_features=2, out_features=3, bias=True)}
    """
    return {name: child for name, (child, _) in _layers(module).items()}


def _layers(module: nn.Module) -> dict[str, tuple[nn.Module, list[nn.Parameter]]]:
    seen: set[int] = set()
    layers: dict[str, tuple[nn.Module, list[nn.Parameter]]] = {}
    for name, child in module.named_modules():
        params = [p for p in child.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            layers[name] = (child, params)
    parts = [name.split(".") for name in layers]
    common = 0
    # Strip the shared leading components, but keep the container's name (``layers.0``, not ``0``).
    while parts and all(len(p) > common + 2 and p[common] == parts[0][common] for p in parts):
        common += 1
    return {".".join(p[common:]) or "(root)": found for p, found in zip(parts, layers.values(), strict=True)}


class TrainableParameters:
    """Notices when a module's trainable parameters change: frozen, unfrozen, or added to an optimizer.

    Walking ``module.parameters()`` costs ~70 µs for a 7-layer MLP, 1% of a full-batch toy step;
    this keeps the parameters of the last :meth:`reset` and compares their ``requires_grad`` flags
    and the optimizers' parameter count (~5 µs). A parameter added to the module mid-fit is noticed
    once it is added to an optimizer, as ``BaseFinetuning.unfreeze_and_add_param_group`` does.

    >>> net = nn.Linear(2, 1)
    >>> watch = TrainableParameters().reset(net, [])
    >>> watch.changed([]), net.bias.requires_grad_(False) is None, watch.changed([])
    (False, False, True)
    """

    def __init__(self) -> None:
        self._params: tuple[nn.Parameter, ...] = ()
        self._flags: tuple[bool, ...] = ()
        self._count = -1

    @staticmethod
    def _optimized(optimizers: list[torch.optim.Optimizer]) -> int:
        return sum(len(group["params"]) for opt in optimizers for group in opt.param_groups)

    def reset(self, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> TrainableParameters:
        self._params = tuple(module.parameters())
        self._flags = tuple(p.requires_grad for p in self._params)
        self._count = self._optimized(optimizers)
        return self

    def changed(self, optimizers: list[torch.optim.Optimizer]) -> bool:
        flags = tuple(p.requires_grad for p in self._params)
        return flags != self._flags or self._optimized(optimizers) != self._count


def is_weight_layer(params: list[nn.Parameter]) -> bool:
    """Layers with a weight matrix (Linear, Conv); norm layers' 1-D scales do not count for gradient flow."""
    return any(p.ndim >= 2 for p in params)


def param_grad_norms(params: list[nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """Each parameter's gradient norm (zero without a gradient), as one tensor on the parameters'
    device (float32), without a host sync."""
    device = params[0].device
    grads = [p.grad if p.grad is not None else torch.zeros(1, device=device) for p in params]
    # torch._foreach_norm is what clip_grad_norm_ uses: one fused kernel per device and dtype.
    norms = torch._foreach_norm(grads, norm_type)
    same = all(n.dtype == torch.float32 and n.device == device for n in norms)
    return torch.stack(norms if same else [n.to(device=device, dtype=torch.float32) for n in norms])


def combine_norms(norms: list[float], norm_type: float = 2.0) -> float:
    """The p-norm of several tensors together, from each one's p-norm (in float64, scaled by the largest).

    >>> combine_norms([3.0, 4.0]), combine_norms([3.0, 4.0], math.inf), combine_norms([])
    (5.0, 4.0, 0.0)
    """
    if norm_type == 2.0:
        return math.hypot(*norms)  # C, scaled: no overflow, no loss
    if not norms:
        return 0.0
    if any(math.isnan(n) for n in norms):
        return math.nan
    largest = max(norms)
    if math.isinf(norm_type) or largest == 0 or math.isinf(largest):
        return largest
    return largest * math.fsum((n / largest) ** norm_type for n in norms) ** (1.0 / norm_type)


def layer_norms(param_norms: list[float], sizes: list[int], norm_type: float = 2.0) -> list[float]:
    """Each layer's norm from its parameters' norms (``sizes``: how many parameters each layer has)."""
    norms, start = [], 0
    for size in sizes:
        norms.append(combine_norms(param_norms[start : start + size], norm_type))
        start += size
    return norms


@dataclass(frozen=True)
class GradProfile:
    """The per-layer gradient norms of one optimizer step.

    >>> GradProfile(0, ("a", "b"), (1e-6, 1e-2), (True, True)).first_to_last()  # doctest: +ELLIPSIS
    9.99...e-05
    >>> GradProfile(0, ("a.weight", "a.bias", "b.weight"), (1.0, 5.0, 4.0), (True, False, True)).first_to_last()
    0.25
    """

    step: int
    names: tuple[str, ...]
    norms: tuple[float, ...]
    weight_layers: tuple[bool, ...]
    total: float = math.nan

    def first_to_last(self) -> float:
        """First weight layer's gradient norm over the last's (0 when the last is 0)."""
        flow = [n for n, weight in zip(self.norms, self.weight_layers, strict=True) if weight] or list(self.norms)
        return flow[0] / flow[-1] if flow[-1] > 0 else 0.0


class GradNormRecorder:
    """Computes a module's per-layer gradient norms when asked (:meth:`record`) and keeps the latest
    ``history_size`` (which steps: :class:`GradientPass`).

    Call :meth:`bind` once the module's parameters exist, then :meth:`record` where the gradients are
    final for the step (Lightning: ``on_before_optimizer_step``). Steps whose gradients are not finite
    (an AMP overflow the scaler will skip) are not recorded; ``skipped_nonfinite`` counts them.

    >>> net = nn.Linear(2, 1)
    >>> net(torch.ones(4, 2)).sum().backward()
    >>> recorder = GradNormRecorder().bind(net)
    >>> recorder.record(step=0).names
    ('(root)',)
    """

    def __init__(self, norm_type: float = 2.0, history_size: int = 1000) -> None:
        if not float(norm_type) > 0:
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        self.norm_type = float(norm_type)
        self.history: deque[GradProfile] = deque(maxlen=history_size)
        self._values: list[float] = []  # the latest per-parameter norms
        self.skipped_nonfinite = 0
        self._layers: dict[str, list[nn.Parameter]] = {}
        self._param_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._sizes: list[int] = []  # how many parameters each layer has
        self._weight_layers: tuple[bool, ...] = ()

    def bind(self, module: nn.Module, only: set[int] | None = None) -> GradNormRecorder:
        """Read which parameters make each layer (again, if they changed: frozen, unfrozen or new);
        with ``only`` (parameter ids, e.g. one optimizer's), just those parameters and their layers."""
        self._layers = parameter_layers(module)
        if only is not None:
            kept = {name: [p for p in params if id(p) in only] for name, params in self._layers.items()}
            self._layers = {name: params for name, params in kept.items() if params}
        self._params = [p for params in self._layers.values() for p in params]
        self._sizes = [len(params) for params in self._layers.values()]
        self._weight_layers = tuple(is_weight_layer(p) for p in self._layers.values())
        short = {id(p): name.rsplit(".", 1)[-1] for name, p in module.named_parameters()}
        self._param_names = [f"{layer}.{short[id(p)]}" for layer, ps in self._layers.items() for p in ps]
        return self

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self._layers)

    @property
    def param_norms(self) -> dict[str, float]:
        """The latest recorded step's norm of each parameter, by ``<layer>.<weight|bias>``."""
        return dict(zip(self._param_names, self._values, strict=True))

    def record(self, step: int) -> GradProfile | None:
        """The profile of this step's gradients (also appended to ``history``); ``None`` if not finite."""
        if not self._layers:
            return None
        # The norms are reduced on the device and copied to the host once; the layers' and the total
        # norm are a few float operations there (on a small net, cheaper than more kernels).
        values = param_grad_norms(self._params, self.norm_type).tolist()
        norms = layer_norms(values, self._sizes, self.norm_type)
        total = combine_norms(norms, self.norm_type)
        if not math.isfinite(total):
            self.skipped_nonfinite += 1
            return None
        profile = GradProfile(step, tuple(self._layers), tuple(norms), self._weight_layers, total)
        self.history.append(profile)
        self._values = values
        return profile

    def since(self, step: int) -> list[GradProfile]:
        """The recorded profiles from ``step`` on (the latest one if none is that recent)."""
        return [p for p in self.history if p.step >= step] or list(self.history)[-1:]


class GradientPass:
    """The per-layer gradient norms of a module, computed at most once per optimizer step, for every
    reader that asks at that step (:class:`~.grad_norm.GradNormMonitor`, :class:`~.plateau.PlateauDetector`).

    Each reader calls :meth:`read` where the gradients are final (Lightning: ``on_before_optimizer_step``)
    with its own rate; the first reader due at a step computes the profile, the others get the same
    one. It also notices parameters that were frozen, unfrozen or added (and reads the layers again),
    and, with several optimizers (manual optimization, a GAN), counts each optimizer's own steps and
    keeps a recorder of each one's parameters, so that an optimizer's step reads its own gradients
    only and "every n steps" means n of that optimizer's steps.

    >>> net = nn.Linear(2, 1)
    >>> net(torch.ones(4, 2)).sum().backward()
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> shared = GradientPass()
    >>> first = shared.read(net, [opt], opt, step=0, every_n_steps=1)
    >>> first is shared.read(net, [opt], opt, step=0, every_n_steps=5), first.index, first.profile.names
    (True, None, ('(root)',))
    """

    def __init__(self, norm_type: float = 2.0, history_size: int = 1000) -> None:
        self.recorder = GradNormRecorder(norm_type, history_size)
        self.per_optimizer: list[GradNormRecorder] = []  # with several optimizers: one recorder each
        self.layer_order: list[str] = []
        self._trainable = TrainableParameters()
        self._module: nn.Module | None = None
        self._counts: list[int] = []
        self._seen: tuple[int, int | None] | None = None  # the (step, optimizer) last counted
        self._latest: dict[int | None, Reading] = {}

    @property
    def norm_type(self) -> float:
        return self.recorder.norm_type

    def bind(self, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> GradientPass:
        """Read the module's layers (again, when its parameters changed) and which optimizer owns which."""
        self._module = module
        self._trainable.reset(module, optimizers)
        self.recorder.bind(module)
        self.layer_order = list(self.recorder.layer_names)
        size = self.recorder.history.maxlen
        if len(optimizers) < 2:
            self.per_optimizer = []
        else:
            self.per_optimizer = [
                GradNormRecorder(self.norm_type, size).bind(
                    module, only={id(p) for g in opt.param_groups for p in g["params"]}
                )
                for opt in optimizers
            ]
        if len(self._counts) != len(self.per_optimizer):
            self._counts = [0] * len(self.per_optimizer)
        return self

    def _index(self, optimizers: list[torch.optim.Optimizer], optimizer: torch.optim.Optimizer) -> int | None:
        if not self.per_optimizer:
            return None
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        return next(i for i, opt in enumerate(optimizers) if opt is inner or opt is optimizer)

    def read(
        self,
        module: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        optimizer: torch.optim.Optimizer,
        step: int,
        every_n_steps: int,
    ) -> Reading | None:
        """This step's norms if the step is due at ``every_n_steps`` (``None`` if not): with one optimizer
        every n global steps, with several every n of this optimizer's own steps. The reading's
        ``profile`` is ``None`` where the gradients are not finite (an AMP overflow the scaler skips)."""
        if module is not self._module:
            self.bind(module, optimizers)
        index = self._index(optimizers, optimizer)
        if self._seen != (step, index):  # a new optimizer step: count it once, however many readers
            self._seen = (step, index)
            if index is not None:
                self._counts[index] += 1
            self._latest.pop(index, None)
        count = step if index is None else self._counts[index] - 1
        due = count % every_n_steps == 0
        if not due or not self.recorder.layer_names:
            return None
        if index not in self._latest:
            if self._trainable.changed(optimizers):  # frozen, unfrozen (BaseFinetuning) or new parameters
                self.bind(module, optimizers)
                index = self._index(optimizers, optimizer)
            recorder = self.recorder if index is None else self.per_optimizer[index]
            self._latest[index] = Reading(index, recorder.record(step), recorder)
        return self._latest[index]

    def since(self, step: int) -> list[GradProfile]:
        """The profiles recorded from ``step`` on, of the whole module (each optimizer's merged)."""
        if self.per_optimizer:
            return merged_profiles(self.per_optimizer, step, self.layer_order)
        return self.recorder.since(step)


@dataclass(frozen=True)
class Reading:
    """One optimizer step's norms, as :meth:`GradientPass.read` gives them: which optimizer (``None``
    with one), the profile (``None`` if not finite), and the recorder that took it."""

    index: int | None
    profile: GradProfile | None
    recorder: GradNormRecorder


_SHARED: weakref.WeakKeyDictionary[object, dict[float, GradientPass]] = weakref.WeakKeyDictionary()


def shared_pass(owner: object, norm_type: float = 2.0) -> GradientPass:
    """The one :class:`GradientPass` of ``owner`` (a Trainer) for this norm type: every callback of a
    trainer that asks for the same norms gets the same pass, and they are computed once a step."""
    passes = _SHARED.setdefault(owner, {})
    return passes.setdefault(float(norm_type), GradientPass(norm_type))


def merged_profiles(recorders: list[GradNormRecorder], step: int, order: list[str]) -> list[GradProfile]:
    """The profiles each optimizer recorded from ``step`` on, as whole-module profiles: the k-th latest
    of every optimizer's together, each layer's norm from its own optimizer's step, in ``order``."""
    windows = [recorder.since(step) for recorder in recorders]
    count = min((len(w) for w in windows), default=0)
    merged = []
    for k in range(count, 0, -1):
        parts = [window[-k] for window in windows]
        layers = {
            name: (norm, weight)
            for part in parts
            for name, norm, weight in zip(part.names, part.norms, part.weight_layers, strict=True)
        }
        names = tuple(name for name in order if name in layers)
        merged.append(
            GradProfile(
                max(p.step for p in parts),
                names,
                tuple(layers[n][0] for n in names),
                tuple(layers[n][1] for n in names),
                math.sqrt(sum(p.total**2 for p in parts)),
            )
        )
    return merged
