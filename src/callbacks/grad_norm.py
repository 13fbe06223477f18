"""Per-layer gradient norms, logged to TensorBoard as one section."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn


def parameter_layers(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The modules that own trainable parameters directly, in registration order, with those parameters.

    Shared leading name components are dropped, keeping the last two, so an MLP wrapped in a
    LightningModule as ``self.net`` reads ``layers.0, layers.1, ...`` rather than ``net.layers.0``.
    """
    layers = {
        name: params
        for name, child in module.named_modules()
        if (params := [p for p in child.parameters(recurse=False) if p.requires_grad])
    }
    parts = [name.split(".") for name in layers]
    common = 0
    # Strip the shared leading components, but keep the container's name (``layers.0``, not ``0``).
    while parts and all(len(p) > common + 2 and p[common] == parts[0][common] for p in parts):
        common += 1
    return {".".join(p[common:]) or "(root)": params for p, params in zip(parts, layers.values(), strict=True)}


def is_weight_layer(params: list[nn.Parameter]) -> bool:
    """Layers with a weight matrix (Linear, Conv); norm layers' 1-D scales do not count for gradient flow."""
    return any(p.ndim >= 2 for p in params)


def grad_norms(layers: dict[str, list[nn.Parameter]], norm_type: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter and per-layer gradient norms, on the parameters' device, without a host sync.

    Returns ``(param_norms, layer_norms)`` following the order of ``layers`` (parameters with no
    gradient count as zero). A layer's norm is the norm of all its gradients together.
    """
    params = [p for params in layers.values() for p in params]
    device = params[0].device
    grads = [p.grad if p.grad is not None else torch.zeros(1, device=device) for p in params]
    # torch._foreach_norm is what clip_grad_norm_ uses: one fused kernel per device and dtype.
    param_norms = torch.stack([n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(grads, norm_type)])
    owner = torch.tensor([i for i, ps in enumerate(layers.values()) for _ in ps], device=device)
    if math.isinf(norm_type):
        layer_norms = torch.zeros(len(layers), device=device).scatter_reduce(0, owner, param_norms, "amax")
    else:
        powered = torch.zeros(len(layers), device=device).index_add(0, owner, param_norms.pow(norm_type))
        layer_norms = powered.pow(1.0 / norm_type)
    return param_norms, layer_norms


def total_norm(layer_norms: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients, from the per-layer norms."""
    if math.isinf(norm_type):
        return layer_norms.max()
    return layer_norms.pow(norm_type).sum().pow(1.0 / norm_type)


@dataclass(frozen=True)
class GradProfile:
    """The per-layer gradient norms of one optimizer step."""

    step: int
    names: tuple[str, ...]
    norms: tuple[float, ...]
    weight_layers: tuple[bool, ...]

    def first_to_last(self) -> float:
        """First weight layer's gradient norm over the last's (0 when the last is 0)."""
        flow = [n for n, weight in zip(self.norms, self.weight_layers, strict=True) if weight] or list(self.norms)
        return flow[0] / flow[-1] if flow[-1] > 0 else 0.0


class GradNormMonitor(Callback):
    r"""Logs the gradient norm of each layer, the total norm and the first-to-last layer ratio.

    A layer is a module that owns parameters directly (each ``Linear``: weight and bias together).
    Norms are read in ``on_before_optimizer_step``: after AMP has unscaled the gradients and before
    gradient clipping, so they are the gradients the loss produced. They are computed on the device
    in one pass and copied to the host once per logged step. Steps whose gradients are not finite
    (an AMP overflow the scaler will skip) are not logged; a warning says so once.

    Logged, at the trainer's global step:
        ``grad_norm/<layer>`` per layer, ``grad_norm/total``, ``grad_norm/first_to_last`` (the first
        over the last layer that has a weight matrix: the gradient flow), and with
        ``per_parameter=True`` also ``grad_norm/<layer>.<weight|bias>``.

    The latest profiles are kept in ``history`` (a bounded deque of :class:`GradProfile`), where
    :class:`~src.callbacks.PlateauDetector` reads them to diagnose a stall.

    Args:
        norm_type: The p of the p-norm: 2 by default, ``inf`` for the largest absolute gradient.
        log_every_n_steps: Compute and log every this many optimizer steps; ``None`` takes the
            Trainer's ``log_every_n_steps``.
        per_parameter: Also log each parameter's norm.
        history_size: How many profiles ``history`` keeps.

    Raises:
        ValueError: If ``norm_type`` is not positive or ``log_every_n_steps`` is below 1.

    Example::

        from src.callbacks import GradNormMonitor
        trainer = Trainer(callbacks=[GradNormMonitor(log_every_n_steps=10)])
    """

    def __init__(
        self,
        norm_type: float = 2.0,
        log_every_n_steps: int | None = None,
        per_parameter: bool = False,
        history_size: int = 1000,
    ) -> None:
        super().__init__()
        norm_type = float(norm_type)
        if not norm_type > 0:
            raise ValueError(f"GradNormMonitor: norm_type must be > 0 or inf, got {norm_type}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"GradNormMonitor: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if history_size < 1:
            raise ValueError(f"GradNormMonitor: history_size must be >= 1, got {history_size}")
        self.norm_type = norm_type
        self.log_every_n_steps = log_every_n_steps
        self.per_parameter = per_parameter
        self.history: deque[GradProfile] = deque(maxlen=history_size)
        self.log_to_loggers = True  # a PlateauDetector without a monitor runs a silent one of its own
        self._layers: dict[str, list[nn.Parameter]] = {}
        self._param_names: list[str] = []
        self._warned_nonfinite = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(norm_type=self.norm_type, per_parameter=self.per_parameter)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._layers = parameter_layers(pl_module)
        short = {id(p): name.rsplit(".", 1)[-1] for name, p in pl_module.named_parameters()}
        self._param_names = [f"grad_norm/{layer}.{short[id(p)]}" for layer, ps in self._layers.items() for p in ps]
        if self.log_every_n_steps is None:
            self.log_every_n_steps = trainer.log_every_n_steps

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if not self._layers or step % self.log_every_n_steps:
            return
        param_norms, layer_norms = grad_norms(self._layers, self.norm_type)
        total = total_norm(layer_norms, self.norm_type)
        host = torch.cat([layer_norms, total.reshape(1), param_norms if self.per_parameter else param_norms[:0]]).cpu()
        values = host.tolist()
        if not math.isfinite(values[len(self._layers)]):
            if not self._warned_nonfinite:
                rank_zero_warn(f"GradNormMonitor: gradients at step {step} are not finite; such steps are not logged")
                self._warned_nonfinite = True
            return
        names = tuple(self._layers)
        profile = GradProfile(
            step, names, tuple(values[: len(names)]), tuple(is_weight_layer(p) for p in self._layers.values())
        )
        self.history.append(profile)
        if self.log_to_loggers and trainer.loggers:
            metrics = {f"grad_norm/{name}": value for name, value in zip(names, profile.norms, strict=True)}
            metrics["grad_norm/total"] = values[len(names)]
            metrics["grad_norm/first_to_last"] = profile.first_to_last()
            if self.per_parameter:
                metrics.update(zip(self._param_names, values[len(names) + 1 :], strict=True))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
