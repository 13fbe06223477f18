"""Log the gradient norm of every layer to TensorBoard (or any logger), as one section."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from .grad_flow import GradNormRecorder, TrainableParameters, due_step, optimizer_recorders
from .names import GRAD_NORM, GRAD_NORM_FIRST_TO_LAST, GRAD_NORM_LOG10, GRAD_NORM_TOTAL, LOG10_FLOOR


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

    The recorded profiles are kept in ``recorder.history`` (see :class:`~.grad_flow.GradNormRecorder`).

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
        try:
            self.recorder = GradNormRecorder(log_every_n_steps or 1, norm_type, history_size, per_parameter)
        except ValueError as err:
            raise ValueError(f"GradNormMonitor: {err}") from None
        self.norm_type = self.recorder.norm_type
        self.per_parameter = per_parameter
        self.log_every_n_steps = log_every_n_steps
        self.log10 = log10
        self.history_size = history_size
        self._warned_nonfinite = False
        # With several optimizers: a recorder of each one's parameters, and each one's step count.
        self._trainable = TrainableParameters()
        self._per_optimizer: list[GradNormRecorder] = []
        self._optimizer_steps: list[int] = []

    @property
    @override
    def state_key(self) -> str:
        # Two monitors in one trainer (say, every step and every 100) keep apart in a checkpoint.
        return self._generate_state_key(
            norm_type=self.norm_type, per_parameter=self.per_parameter, log_every_n_steps=self.log_every_n_steps
        )

    @property
    def history(self):
        """The recorded :class:`~.grad_flow.GradProfile`\\ s, oldest first."""
        return self.recorder.history

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After configure_model: the parameters exist now.
        self._bind(trainer, pl_module)

    def _bind(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainable.reset(pl_module, trainer.optimizers)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        self.recorder.every_n_steps = every
        self.recorder.bind(pl_module)
        recorders = optimizer_recorders(
            pl_module, trainer.optimizers, every,
            norm_type=self.norm_type, history_size=self.history_size, per_parameter=self.per_parameter,
        )  # fmt: skip
        if len(recorders) != len(self._optimizer_steps):
            self._optimizer_steps = [0] * len(recorders)
        self._per_optimizer = recorders

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        due, index = due_step(self.recorder, self._optimizer_steps, trainer.optimizers, optimizer, step)
        if not due:
            return
        if self._trainable.changed(trainer.optimizers):  # frozen, unfrozen (BaseFinetuning) or new parameters
            self._bind(trainer, pl_module)
        recorder = self.recorder if index is None else self._per_optimizer[index]
        suffix = "" if index is None else f"/optimizer_{index}"
        profile = recorder.record(step)
        if profile is None:
            if not self._warned_nonfinite:
                rank_zero_warn(f"GradNormMonitor: gradients at step {step} are not finite; such steps are not logged")
                self._warned_nonfinite = True
            return
        if not trainer.loggers:
            return
        metrics = {f"{GRAD_NORM}{name}": value for name, value in zip(profile.names, profile.norms, strict=True)}
        metrics[f"{GRAD_NORM_TOTAL}{suffix}"] = profile.total
        metrics[f"{GRAD_NORM_FIRST_TO_LAST}{suffix}"] = profile.first_to_last()
        metrics.update((f"{GRAD_NORM}{name}", value) for name, value in recorder.param_norms.items())
        if self.log10:
            metrics.update(
                (f"{GRAD_NORM_LOG10}{name}", math.log10(value) if value > 0 else LOG10_FLOOR)
                for name, value in zip(profile.names, profile.norms, strict=True)
            )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
