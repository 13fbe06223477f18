"""Log what every layer does: saturated and dead units, activation mean and std, update-to-weight and
gradient-to-weight ratios, and histograms (the statistics themselves are in :mod:`.layer_stats`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from .grad_flow import shared_pass
from .layer_stats import Histogram, LayerStatistics, LayerStats, histogram, shared_statistics
from .names import (
    ACT_MEAN,
    ACT_STD,
    DEAD,
    GRAD_TO_WEIGHT,
    HIST_ACTIVATION,
    HIST_GRADIENT,
    HIST_WEIGHT,
    LOG10_FLOOR,
    SATURATED,
    UPDATE_RATIO_LOG10,
    UPDATE_RATIO_REFERENCE,
)

DEFAULT_MARGIN = 0.03


def mean_over_ranks(trainer: L.Trainer):
    """A tensor's mean over the processes under DDP (``None`` with one: nothing to reduce)."""
    return (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None


@runtime_checkable
class HistogramLogger(Protocol):
    """A logger that writes several histograms at once (the template's ``BatchedTensorBoardLogger``:
    one event for all of them). Any other ``TensorBoardLogger`` gets one ``add_histogram_raw`` each."""

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None: ...


class LayerStatsMonitor(Callback):
    r"""Logs, per layer, what its units do and how far each optimizer step moves its weights.

    Every ``log_every_n_steps`` optimizer steps (default: the Trainer's), for each ``Linear`` and
    ``Conv`` layer with a trainable weight, and the activation module called after it (see
    :mod:`.layer_stats` for how layers and activations are found, and what a functional ``F.relu``
    gets: the layer's own output, no shares):

    - ``act_mean/<layer>``, ``act_std/<layer>``: of the activation's output on the batch;
    - ``saturated/<layer>`` (bounded activations): the share of outputs within ``margin`` of a bound
      (a fraction of the half-range: 0.03 is Karpathy's ``|tanh| > 0.97``);
    - ``dead/<layer>`` (the ReLU family): the share of units with no positive output on the batch;
    - ``update_ratio_log10/<layer>``: log10(||ΔW|| / ||W||) over the step the optimizer actually took
      (any optimizer), with ``update_ratio_log10/reference`` at -3 for the chart;
    - ``grad_to_weight/<layer>``: ||grad W|| / ||W||, from the trainer's one gradient pass (shared with
      ``GradNormMonitor`` and ``PlateauDetector``).

    Every ``histogram_every_n_steps`` (default 10x rarer) it adds TensorBoard histograms of each
    layer's activations, weight gradients and weights (``hist_activation/<layer>``...; 30 buckets
    over at most 4096 values each, counted on the device), from rank 0. Under DDP the statistics
    are averaged over the ranks (one collective per logged step). Under AMP they are computed in
    float32. With another ``margin`` the saturated tag is ``saturated_m<margin>/``, so two monitors
    keep apart. The forward hooks exist only during the logged steps' forward pass.

    Args:
        margin: How close to a bound an output counts as saturated, as a fraction of the half-range, in (0, 1).
        log_every_n_steps: Log every this many optimizer steps; ``None`` takes the Trainer's.
        histogram_every_n_steps: Histograms every this many steps; ``None``: 10x ``log_every_n_steps``;
            0 turns them off.

    Raises:
        ValueError: If ``margin`` is not in (0, 1), or a rate is below 1 (the histograms' below 0).

    Example::

        from src.callbacks import LayerStatsMonitor
        trainer = Trainer(callbacks=[LayerStatsMonitor(log_every_n_steps=10)])
    """

    def __init__(
        self,
        margin: float = DEFAULT_MARGIN,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < margin < 1:
            raise ValueError(f"LayerStatsMonitor: margin must be in (0, 1), got {margin}")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"LayerStatsMonitor: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        if histogram_every_n_steps is not None and histogram_every_n_steps < 0:
            raise ValueError(
                f"LayerStatsMonitor: histogram_every_n_steps must be >= 1 (or 0: none), got {histogram_every_n_steps}"
            )
        self.margin = margin
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.saturated_prefix = SATURATED if margin == DEFAULT_MARGIN else f"saturated_m{margin:g}/"
        self.stats = LayerStatistics(margin)  # until setup shares the trainer's
        self._step: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(margin=self.margin, log_every_n_steps=self.log_every_n_steps)

    def _every(self, trainer: L.Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    def _histograms_due(self, trainer: L.Trainer, step: int) -> bool:
        every = self.histogram_every_n_steps
        every = 10 * self._every(trainer) if every is None else every
        return every > 0 and step % every == 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stats = shared_statistics(trainer, self.margin)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self._every(trainer) == 0:
            self._step = step
            self.stats.keep_samples = self.stats.keep_samples or self._histograms_due(trainer, step)
            self.stats.arm(pl_module, step)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._step != trainer.global_step:
            return
        reading = shared_pass(trainer).read(pl_module, trainer.optimizers, optimizer, self._step, self._every(trainer))
        self.stats.before_step(pl_module, reading)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        stats = self.stats.finish(pl_module, mean_over_ranks(trainer))
        if stats and trainer.loggers:
            metrics = self.metrics(stats)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if self._histograms_due(trainer, step):
            self._histograms(trainer, step)
            self.stats.keep_samples = False

    def metrics(self, stats: dict[str, LayerStats]) -> dict[str, float]:
        """The scalars of one recorded step, by tag."""
        metrics: dict[str, float] = {UPDATE_RATIO_REFERENCE: -3.0}
        for name, s in stats.items():
            metrics[f"{ACT_MEAN}{name}"], metrics[f"{ACT_STD}{name}"] = s.act_mean, s.act_std
            if s.saturated is not None:
                metrics[f"{self.saturated_prefix}{name}"] = s.saturated
            if s.dead is not None:
                metrics[f"{DEAD}{name}"] = s.dead
            if s.update_ratio is not None:
                metrics[f"{UPDATE_RATIO_LOG10}{name}"] = (
                    math.log10(s.update_ratio) if s.update_ratio > 0 else LOG10_FLOOR
                )
            if s.grad_to_weight is not None:
                metrics[f"{GRAD_TO_WEIGHT}{name}"] = s.grad_to_weight
        return metrics

    def _histograms(self, trainer: L.Trainer, step: int) -> None:
        samples, self.stats.samples = self.stats.samples, {}
        if not trainer.is_global_zero:
            return
        tags = {"activation": HIST_ACTIVATION, "gradient": HIST_GRADIENT, "weight": HIST_WEIGHT}
        loggers = [lg for lg in trainer.loggers if isinstance(lg, (HistogramLogger, TensorBoardLogger))]
        if not loggers:
            return
        histograms = {
            f"{tags[kind]}{name}": histogram(tensor)
            for name, values in samples.items()
            for kind, tensor in values.items()
        }
        for logger in loggers:
            if isinstance(logger, HistogramLogger):
                logger.log_histograms(histograms, step)
                continue
            for tag, h in histograms.items():
                logger.experiment.add_histogram_raw(
                    tag, h.min, h.max, h.num, h.sum, h.sum_squares, h.bucket_limits, h.bucket_counts, step
                )
