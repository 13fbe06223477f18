"""TensorBoard dashboards for a run: a custom-scalars layout, lr/momentum curves and the hparams table."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .escape_actions import settings_of
from .events import Action, EventKind, StallEvent
from .grad_flow import parameter_layers
from .names import (
    ACT_STD,
    DEAD,
    FINAL,
    FINAL_EPOCHS,
    FINAL_STALLS,
    GRAD_NORM,
    GRAD_NORM_FIRST_TO_LAST,
    GRAD_NORM_LOG10,
    GRAD_NORM_TOTAL,
    OPTIM_LR,
    OPTIM_MOMENTUM,
    PLATEAU,
    PLATEAU_ACTIONS_TEXT,
    PLATEAU_EVENTS_TEXT,
    SATURATED,
    UPDATE_RATIO_LOG10,
    UPDATE_RATIO_REFERENCE,
)
from .plateau_rule import StallReporter, describe_event


def custom_scalars_layout(layer_names: list[str]) -> dict[str, dict[str, list[Any]]]:
    """The layout of TensorBoard's Custom Scalars tab: one chart per question a user asks of a run."""
    layers = "|".join(re.escape(name) for name in layer_names) or ".*"
    exact = re.escape
    saturated = rf"{exact(SATURATED.rstrip('/'))}(_m[0-9.e-]+)?/"  # any margin's
    return {
        "Why is it not learning?": {
            "gradient norm of every layer (log10)": ["Multiline", [rf"^{exact(GRAD_NORM_LOG10)}({layers})$"]],
            "loss, with stall / divergence markers": ["Multiline", [r"^(train|val)/loss$", rf"^{exact(PLATEAU)}"]],
            "lr and momentum": ["Multiline", [rf"^({exact(OPTIM_LR)}|{exact(OPTIM_MOMENTUM)})(_pg\d+)?$"]],
            "first-to-last layer gradient ratio": ["Multiline", [rf"^{exact(GRAD_NORM_FIRST_TO_LAST)}$"]],
        },
        "What each layer does": {
            "saturated share per layer (bounded activations)": ["Multiline", [rf"^{saturated}({layers})$"]],
            "dead share per layer (ReLU family)": ["Multiline", [rf"^{exact(DEAD)}({layers})$"]],
            "update-to-weight ratio per layer (log10; reference -3)": [
                "Multiline",
                [rf"^{exact(UPDATE_RATIO_LOG10)}({layers})$", rf"^{exact(UPDATE_RATIO_REFERENCE)}$"],
            ],
            "activation std per layer": ["Multiline", [rf"^{exact(ACT_STD)}({layers})$"]],
        },
        "Metrics": {
            "accuracy": ["Multiline", [r"^(train|val|test)/acc$"]],
            "total gradient norm": ["Multiline", [rf"^{exact(GRAD_NORM_TOTAL)}$"]],
            "gradient norm of every layer (linear)": ["Multiline", [rf"^{exact(GRAD_NORM)}({layers})$"]],
        },
    }


class TensorBoardDashboard(Callback):
    """Make a run readable in TensorBoard without configuring anything.

    - At fit start, writes a Custom Scalars layout: every layer's gradient norm in one chart (log10:
      ``GradNormMonitor`` logs it; the linear values are under "Metrics"); the
      train/val loss together with the ``plateau/stall`` / ``plateau/divergence`` markers of a
      :class:`~.plateau.PlateauDetector` (the same step axis); lr and momentum in one chart; and
      what each layer does (``LayerStatsMonitor``): saturated and dead shares per layer, the
      update-to-weight ratio per layer with its -3 reference, the activations' std.
    - Every ``log_every_n_steps`` steps (default: the Trainer's), logs ``optim/lr`` and
      ``optim/momentum`` of the first param group, so the effect of an escape action is visible.
      Not Lightning's ``LearningRateMonitor``: it names its keys after the optimizer class
      (``lr-SGD``, ``lr-Adam-momentum``), so the chart would change with the optimizer.
    - At fit end, writes the hparams summary: the model's hyperparameters, the optimizer and the
      data with every scalar metric of the run as ``final/<name>`` (``final/train/loss``...) and the
      number of stalls, so that the HPARAMS tab compares runs side by side. Give the logger
      ``default_hp_metric=False`` (the CLI does) to leave out Lightning's placeholder ``hp_metric``.

    Does nothing without a ``TensorBoardLogger``.

    Args:
        log_every_n_steps: How often lr and momentum are logged; ``None`` takes the Trainer's.

    Raises:
        ValueError: If ``log_every_n_steps`` is below 1.

    Example::

        from lightning.pytorch.loggers import TensorBoardLogger
        from src.callbacks import TensorBoardDashboard
        trainer = Trainer(logger=TensorBoardLogger(".", default_hp_metric=False), callbacks=[TensorBoardDashboard()])
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"TensorBoardDashboard: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps

    @staticmethod
    def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._tensorboard(trainer)
        if logger is not None and trainer.is_global_zero:
            logger.experiment.add_custom_scalars(custom_scalars_layout(list(parameter_layers(pl_module))))

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if not trainer.optimizers or (step - 1) % every or not trainer.is_global_zero:
            return
        log_optimizer_settings(trainer, step)

    @override
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
            f"{FINAL}{name}": float(value)
            for name, value in trainer.callback_metrics.items()
            if value.numel() == 1 and math.isfinite(float(value))
        }
        events = [e for cb in trainer.callbacks if isinstance(cb, StallReporter) for e in cb.events]
        metrics[FINAL_STALLS] = float(sum(e.kind is EventKind.STALL for e in events))
        metrics[FINAL_EPOCHS] = float(trainer.current_epoch)
        logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
        logger.experiment.flush()


def log_event(trainer: L.Trainer, event: StallEvent, divergence_threshold: float | None = None) -> None:
    """Write a stall or divergence event to the trainer's loggers: a ``plateau/<kind>`` scalar marker
    at the event's step and a text entry (TensorBoard, rank zero). The marker sits on the monitored
    curve: its value is the value the event saw (a divergence's NaN/inf reads as
    ``divergence_threshold``, or 0), so it shows on the loss chart without stretching its axis."""
    value = event.value if math.isfinite(event.value) else (divergence_threshold or 0.0)
    marker = {f"{PLATEAU}{event.kind.value}": float(value)}
    for logger in trainer.loggers:
        logger.log_metrics(marker, step=event.step)
        if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
            logger.experiment.add_text(PLATEAU_EVENTS_TEXT, describe_event(event), event.step)


def log_action(
    trainer: L.Trainer, event: StallEvent, what: str, epoch: int, step: int, lr_raise: bool = False,
    lr_from: list[float] | None = None,
) -> Action:  # fmt: skip
    """Record an escape action on its ``event``, with the lr and momentum the first optimizer's
    groups hold now (and each lr before, ``lr_from``, where it changed); say it on rank zero and log
    it: ``optim/lr``, ``optim/momentum`` and a text entry at ``step``."""
    settings = settings_of(trainer.optimizers[0])
    changed = lr_from is not None and lr_from != settings["lr"]
    record = Action(what, epoch, step, settings["lr"], settings["momentum"], lr_from if changed else None, lr_raise)
    event.actions.append(record)
    lr_text = f"lr {lr_from} -> {settings['lr']}" if changed else f"lr {settings['lr']}"
    rank_zero_info(f"PlateauEscape: epoch {epoch}: {what} -> {lr_text}")
    log_optimizer_settings(trainer, step)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
            logger.experiment.add_text(PLATEAU_ACTIONS_TEXT, f"epoch {epoch}: {what}", step)
    return record


def log_optimizer_settings(trainer: L.Trainer, step: int) -> None:
    """Log the first optimizer's lr and momentum (Adam's beta1) for every param group: ``optim/lr``,
    ``optim/momentum`` for group 0, ``optim/lr_pg1``... for the others."""
    metrics = {}
    for i, group in enumerate(trainer.optimizers[0].param_groups):
        suffix = f"_pg{i}" if i else ""
        metrics[f"{OPTIM_LR}{suffix}"] = float(group["lr"])
        if "momentum" in group:
            metrics[f"{OPTIM_MOMENTUM}{suffix}"] = float(group["momentum"])
        elif "betas" in group:
            metrics[f"{OPTIM_MOMENTUM}{suffix}"] = float(group["betas"][0])
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
