"""Log the gradient norm of every layer to TensorBoard (or any logger), as one section."""

from __future__ import annotations

import math
from collections import deque

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from .grad_flow import GradientPass, GradProfile, shared_pass
from .names import GRAD_NORM, GRAD_NORM_LOG10, LOG10_FLOOR, grad_norm_prefix


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
        ``per_parameter=True`` also ``grad_norm/<layer>.<weight|bias>``; with ``log10=True`` (the
        default) also ``grad_norm_log10/<layer>``, the log10 of each layer's norm (-30 for a zero
        norm): a vanishing profile spans 1e-15 .. 1e-1, which a linear chart shows as zero and a spike.
        With another norm type than 2 the prefix is ``grad_norm_p<p>/`` (``grad_norm_pinf/``, and
        ``grad_norm_pinf_log10/``), so that two monitors of different norm types keep apart.

    The norms come from the trainer's one :class:`~.grad_flow.GradientPass`: a ``PlateauDetector`` (or
    another monitor of the same norm type) in the same trainer reads the same computation, so a
    logged step costs one pass over the gradients whoever reads it. The profiles this monitor
    logged are in ``history`` (the newest ``history_size``).

    With several optimizers (manual optimization, a GAN), each optimizer's step logs the norms of its
    own parameters, every ``log_every_n_steps`` of its own steps; the total and the ratio get the
    suffix ``/optimizer_<i>`` (the layer names already differ).

    Args:
        norm_type: The p of the p-norm: 2 by default, ``inf`` for the largest absolute gradient.
        log_every_n_steps: Compute and log every this many optimizer steps; ``None`` takes the
            Trainer's ``log_every_n_steps``.
        per_parameter: Also log each parameter's norm.
        history_size: How many profiles the recorder keeps.
        log10: Also log each layer's norm as log10 (what the dashboard's first chart shows).

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
        log10: bool = True,
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"GradNormMonitor: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if not float(norm_type) > 0:
            raise ValueError(f"GradNormMonitor: norm_type must be > 0 or inf, got {norm_type}")
        if history_size < 1:
            raise ValueError(f"GradNormMonitor: history_size must be >= 1, got {history_size}")
        self.norm_type = float(norm_type)
        self.prefix = grad_norm_prefix(self.norm_type)
        self.per_parameter = per_parameter
        self.log_every_n_steps = log_every_n_steps
        self.log10 = log10
        self.history_size = history_size
        self.gradients = GradientPass(self.norm_type)  # until setup shares the trainer's
        self.history: deque[GradProfile] = deque(maxlen=history_size)  # what this monitor logged
        self._warned_nonfinite = False

    @property
    @override
    def state_key(self) -> str:
        # Two monitors in one trainer (say, every step and every 100) keep apart in a checkpoint.
        return self._generate_state_key(
            norm_type=self.norm_type, per_parameter=self.per_parameter, log_every_n_steps=self.log_every_n_steps
        )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.gradients = shared_pass(trainer, self.norm_type)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        reading = self.gradients.read(pl_module, trainer.optimizers, optimizer, step, every)
        if reading is None:
            return
        profile, recorder = reading.profile, reading.recorder
        suffix = "" if reading.index is None else f"/optimizer_{reading.index}"
        if profile is None:
            if not self._warned_nonfinite:
                rank_zero_warn(f"GradNormMonitor: gradients at step {step} are not finite; such steps are not logged")
                self._warned_nonfinite = True
            return
        self.history.append(profile)
        if not trainer.loggers:
            return
        prefix = self.prefix
        metrics = {f"{prefix}{name}": value for name, value in zip(profile.names, profile.norms, strict=True)}
        metrics[f"{prefix}total{suffix}"] = profile.total
        metrics[f"{prefix}first_to_last{suffix}"] = profile.first_to_last()
        if self.per_parameter:
            metrics.update((f"{prefix}{name}", value) for name, value in recorder.param_norms.items())
        if self.log10:
            log10 = GRAD_NORM_LOG10 if prefix == GRAD_NORM else f"{prefix.rstrip('/')}_log10/"
            metrics.update(
                (f"{log10}{name}", math.log10(value) if value > 0 else LOG10_FLOOR)
                for name, value in zip(profile.names, profile.norms, strict=True)
            )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
