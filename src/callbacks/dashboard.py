"""TensorBoard dashboards for a run: a custom-scalars layout, lr/momentum curves and the hparams table."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from src.callbacks.grad_norm import parameter_layers

FINAL_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/prob_mae")


def custom_scalars_layout(layer_names: list[str]) -> dict[str, dict[str, list[Any]]]:
    """The layout of TensorBoard's Custom Scalars tab: one chart per question a user asks of a run."""
    layers = "|".join(re.escape(name) for name in layer_names) or ".*"
    return {
        "Why is it not learning?": {
            "gradient norm of every layer": ["Multiline", [rf"^grad_norm/({layers})$"]],
            "loss, with stall / divergence markers": ["Multiline", [r"^(train|val)/loss$", r"^plateau/"]],
            "lr and momentum": ["Multiline", [r"^optim/(lr|momentum)$"]],
            "first-to-last layer gradient ratio": ["Multiline", [r"^grad_norm/first_to_last$"]],
        },
        "Metrics": {
            "accuracy": ["Multiline", [r"^(train|val|test)/acc$"]],
            "total gradient norm": ["Multiline", [r"^grad_norm/total$"]],
        },
    }


class TensorBoardDashboard(Callback):
    """Make a run readable in TensorBoard without configuring anything.

    - At fit start, writes a Custom Scalars layout: every layer's gradient norm in one chart; the
      train/val loss together with the ``plateau/stall`` / ``plateau/divergence`` markers of a
      :class:`~src.callbacks.PlateauDetector` (the same step axis); lr and momentum in one chart.
    - Every ``log_every_n_steps`` steps (default: the Trainer's), logs ``optim/lr`` and
      ``optim/momentum`` of the first param group, so the effect of an escape action is visible.
    - At fit end, writes the hparams summary: the model's hyperparameters, the optimizer and the
      data with the final metrics (``final/train/loss``...) and the number of stalls, so that the
      HPARAMS tab compares runs side by side. Lightning's placeholder ``hp_metric`` is turned off.

    Does nothing without a ``TensorBoardLogger``.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"TensorBoardDashboard: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps

    @staticmethod
    def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = self._tensorboard(trainer)
        if logger is not None:
            logger._default_hp_metric = False  # the real metrics go in at fit end

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._tensorboard(trainer)
        if logger is not None and trainer.is_global_zero:
            logger.experiment.add_custom_scalars(custom_scalars_layout(list(parameter_layers(pl_module))))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if not trainer.optimizers or (step - 1) % every or not trainer.is_global_zero:
            return
        group = trainer.optimizers[0].param_groups[0]
        metrics = {"optim/lr": float(group["lr"])}
        if "momentum" in group:
            metrics["optim/momentum"] = float(group["momentum"])
        elif "betas" in group:
            metrics["optim/momentum"] = float(group["betas"][0])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        params: dict[str, Any] = {k: v for k, v in pl_module.hparams.items() if not k.startswith("_")}
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            group = optimizer.param_groups[0]
            params["optimizer"] = type(optimizer).__name__
            params["lr"] = float(group.get("initial_lr", group["lr"]))
        if trainer.datamodule is not None:
            params["data"] = type(trainer.datamodule).__name__
        metrics = {
            f"final/{name}": float(trainer.callback_metrics[name])
            for name in FINAL_METRICS
            if name in trainer.callback_metrics and math.isfinite(float(trainer.callback_metrics[name]))
        }
        events = [e for cb in trainer.callbacks for e in getattr(cb, "events", [])]
        metrics["final/stalls"] = float(sum(e.get("kind") == "stall" for e in events))
        metrics["final/epochs"] = float(trainer.current_epoch)
        logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
        logger.experiment.flush()
