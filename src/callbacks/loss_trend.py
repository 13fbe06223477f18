"""Has a noisy, mini-batch training loss stopped falling? A line fitted to the last steps' losses.

An epoch-end check (:class:`~.plateau_rule.PlateauTracker`) sees one value per epoch: on a data set
of 550 batches, ``patience=100`` checks are 55,000 steps, and a run that has not moved for ten
epochs is never reported. The step losses cannot go into that rule as they are either: its test
("a value better than the best so far by ``min_delta``") reads noise as improvement early on and,
later, a healthy run's noise as a stall.

:class:`LossTrend` asks the question the noise allows: fit a line to the last ``window`` step
losses; the run has stalled when even an optimistic reading of that line (its slope plus ``z``
standard errors) drops the loss by less than ``min_delta`` of its mean over the window. The noisier
the losses, the wider the bound, so noise alone never makes a stall; a drift too slow to matter
(0.1% at chance over thousands of steps) does. Measured on Fashion-MNIST (batch 100, 550 steps an
epoch, ``window=500``, ``min_delta=0.01``): a stuck deep sigmoid net (2.3068 -> 2.3063 over four
epochs) is stalled at its first full window; a healthy ReLU net under Adam (0.47 -> 0.19 over ten
epochs) never is. :class:`~.plateau.PlateauDetector` keeps the losses in a :class:`StepLosses`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .plateau_rule import Status


@dataclass(frozen=True)
class Trend:
    """What a line through a window of losses says: their ``mean``; ``drop``, the fall along the
    line over the window, as a share of ``mean`` (negative: the loss rose); ``optimistic``, that
    drop with ``z`` standard errors of the slope added."""

    mean: float
    drop: float
    optimistic: float


def fit_trend(values: Sequence[float], z: float = 2.0) -> Trend:
    """Least-squares line through ``values`` (one per step): the relative drop over the window.

    >>> fit_trend([4.0, 3.0, 2.0, 1.0])
    Trend(mean=2.5, drop=1.2, optimistic=1.2)
    >>> trend = fit_trend([2.0, 2.1, 1.9, 2.0, 2.1, 1.9])  # noise: a small drop, a wide bound
    >>> round(trend.drop, 3), round(trend.optimistic, 3)
    (0.029, 0.145)
    """
    n = len(values)
    if n < 3:
        raise ValueError(f"a trend needs at least 3 values, got {n}")
    mean = math.fsum(values) / n
    centre = (n - 1) / 2
    sxx = n * (n * n - 1) / 12  # sum of (t - centre)^2 over t = 0 .. n-1
    slope = math.fsum((t - centre) * (v - mean) for t, v in enumerate(values)) / sxx
    residual = math.fsum((v - mean - slope * (t - centre)) ** 2 for t, v in enumerate(values))
    stderr = math.sqrt(residual / (n - 2) / sxx)
    scale = abs(mean) or 1.0
    return Trend(mean, -slope * (n - 1) / scale, (-slope + z * stderr) * (n - 1) / scale)


class LossTrend:
    """The step rule. Every ``every`` steps, once ``window`` losses have come in since the start or
    the last stall, it fits a line to them (:func:`fit_trend`). The run has stalled when both:

    - even the optimistic reading of the line drops the loss by less than ``min_delta`` of its mean;
    - the window's mean is not below the best mean of an earlier window that does not overlap it
      (by ``min_delta`` of that mean), if there is one.

    The second test is there because a line through less than an epoch can rise in a healthy run:
    a net that learns its training set sees, late in each epoch, samples it last saw longer ago
    (Adam on Fashion-MNIST: 0.240 -> 0.259 within an epoch, 0.23 at the next epoch's start).
    Lower is better (a loss).

    >>> rule = LossTrend(window=4, min_delta=0.01, every=2)
    >>> [rule.due(step) for step in (2, 3, 4)]
    [False, False, True]
    >>> rule.check(4, fit_trend([4.0, 3.0, 2.0, 1.0])), rule.check(6, fit_trend([1.0, 1.0, 1.0, 1.0]))
    (False, True)
    >>> rule.restart(6); rule.check(10, fit_trend([3.0, 3.0, 3.0, 3.0]))  # flat, above the best (1.0)
    True
    """

    def __init__(self, window: int = 500, min_delta: float = 0.01, every: int | None = None, z: float = 2.0) -> None:
        if window < 3:
            raise ValueError(f"step_window must be >= 3, got {window}")
        if not 0 < min_delta < 1:
            raise ValueError(f"step_min_delta must be in (0, 1), got {min_delta}")
        self.window, self.min_delta, self.z = window, min_delta, z
        self.every = every or max(1, window // 10)
        self.start = 0  # the step the current window counts from
        self.best: float | None = None  # the best mean of a window that ended a window ago or more
        self.recent: list[tuple[int, float]] = []  # (step, mean) of the windows checked since

    def due(self, step: int) -> bool:
        """Whether a check happens after ``step`` (a full window since ``start``, on the ``every`` grid)."""
        return step - self.start >= self.window and step % self.every == 0

    def check(self, step: int, trend: Trend) -> bool:
        """Whether the window ending at ``step``, whose line is ``trend``, is a stall."""
        while self.recent and self.recent[0][0] <= step - self.window:
            _, mean = self.recent.pop(0)
            self.best = mean if self.best is None else min(self.best, mean)
        self.recent.append((step, trend.mean))
        flat = trend.optimistic < self.min_delta
        return flat and (self.best is None or trend.mean > self.best - self.min_delta * abs(self.best))

    def restart(self, step: int, forget: bool = False) -> None:
        """A stall was reported: the next needs a full window of its own (``forget``: and is not
        compared with the windows before, as after a remedy that changed the model)."""
        self.start = step
        if forget:
            self.best, self.recent = None, []

    def state_dict(self) -> dict:
        return {"start": self.start, "best": self.best, "recent": [list(r) for r in self.recent]}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.best = state["start"], state["best"]
        self.recent = [(int(step), float(mean)) for step, mean in state["recent"]]


EPOCH_BLOCKS = 5  # whole epochs in a window from which the line goes through their means (StepWatch.check)


class StepLosses:
    """The training losses of the last ``window`` optimizer steps, kept as the steps give them (no host
    sync per step: a tensor is read once per check), each with the step it came at, averaged over the
    processes when read. A step can hold several (gradient accumulation) or a batch several steps (an
    optimizer stepped twice under manual optimization). Each loss keeps its epoch too (:meth:`by_epoch`)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.values: deque[float | torch.Tensor] = deque()
        self.steps: deque[int] = deque()
        self.epochs: deque[int] = deque()

    def add(self, outputs: Any, step: int, scale: float = 1.0, epoch: int = -1) -> bool:
        """Keep the loss of a ``training_step``'s ``outputs`` (a tensor, or a mapping with ``loss``), times
        ``scale``, as of ``step`` in ``epoch``; ``False`` when there is none (manual optimization may return
        nothing)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return False
        self.values.append(loss.detach().reshape(()) * scale if scale != 1.0 else loss.detach().reshape(()))
        self.steps.append(step)
        self.epochs.append(epoch)
        while self.steps[0] <= step - self.window:
            self.steps.popleft()
            self.values.popleft()
            self.epochs.popleft()
        return True

    def by_epoch(self, values: list[float], batches: int) -> list[float]:
        """The mean of ``values`` (as :meth:`read` gives them) over each epoch the window holds whole, with
        its ``batches`` losses (the first and the current one are seldom whole)."""
        groups: dict[int, list[float]] = {}
        for epoch, value in zip(self.epochs, values, strict=True):
            groups.setdefault(epoch, []).append(value)
        return [math.fsum(g) / len(g) for epoch, g in groups.items() if epoch >= 0 and len(g) == batches]

    def read(self, trainer: Any) -> list[float]:
        """The window as floats, the mean over the processes under DDP (every rank reads alike)."""
        floats = [float(v) if not isinstance(v, torch.Tensor) else math.nan for v in self.values]
        at = [i for i, v in enumerate(self.values) if isinstance(v, torch.Tensor)]
        if at:  # one host sync for the window
            read = torch.stack([self.values[i] for i in at]).float().cpu().tolist()
            for i, value in zip(at, read, strict=True):
                floats[i] = value
        if trainer.world_size > 1:
            synced = torch.tensor(floats, device=trainer.strategy.root_device)
            floats = trainer.strategy.reduce(synced, reduce_op="mean").cpu().tolist()
        return floats

    def since(self, step: int) -> int:
        """How many of the losses came after ``step``."""
        return sum(1 for at in self.steps if at > step)

    def state_dict(self) -> dict:
        return {"values": [float(v) for v in self.values], "steps": list(self.steps), "epochs": list(self.epochs)}

    def load_state_dict(self, state: dict | list[float]) -> None:
        self.values.clear()
        self.steps.clear()
        self.epochs.clear()
        if isinstance(state, dict):  # a plain list (steps unknown) was saved before the window counted steps
            self.values.extend(float(v) for v in state["values"])
            self.steps.extend(int(s) for s in state["steps"])
            self.epochs.extend(int(e) for e in state.get("epochs", [-1] * len(self.values)))


class StepWatch:
    """The step rule with its losses, as :class:`~.plateau.PlateauDetector` runs it: :meth:`add`
    each training batch's outputs, :meth:`check` when that says a check is due. Its window and grid
    count optimizer steps (``trainer.global_step``), whatever the batches a step (gradient
    accumulation) or the steps a batch (manual optimization)."""

    def __init__(self, window: int = 500, min_delta: float = 0.01) -> None:
        self.rule = LossTrend(window, min_delta)
        self.losses = StepLosses(window)
        self._last = -1  # the step last checked (with gradient accumulation, several batches share one)

    def add(self, outputs: Any, trainer: Any) -> bool:
        """Keep the loss in ``outputs`` (Lightning's, divided by the batches a step under gradient
        accumulation: as ``training_step`` returned it); whether a check is due now."""
        step = trainer.global_step
        automatic = getattr(trainer.lightning_module, "automatic_optimization", True)
        scale = trainer.accumulate_grad_batches if automatic else 1
        if not self.losses.add(outputs, step, scale, trainer.current_epoch):
            return False
        if step == self._last or not self.rule.due(step):
            return False
        self._last = step
        return True

    def check(self, trainer: Any, diverged: Callable[[float], bool]) -> tuple[Status, float, int]:
        """What the window says: ``DIVERGED`` (the mean loss of the last ``every`` steps is NaN,
        infinite or ``diverged``), ``PLATEAU`` or ``WAITING`` (also with fewer than 3 losses); the
        value (that mean, or the window's); the window's first step.

        Where the window holds ``EPOCH_BLOCKS`` epochs or more whole, the line goes through their means: an
        epoch of a finite data set holds each sample once, so its mean has none of the noise of which samples
        a batch drew (4-class blobs, batches of 32, at a plateau that has one class apart: ~10% from batch to
        batch, 0.2-0.4% from epoch to epoch). Through the step losses the line's bound stays above 1% at any
        window under 4800 steps, and the plateau was never reported."""
        values, step = self.losses.read(trainer), trainer.global_step
        latest = values[len(values) - self.losses.since(step - self.rule.every) :]
        mean = math.fsum(latest) / len(latest) if latest else math.nan
        if latest and (not math.isfinite(mean) or diverged(mean)):
            return Status.DIVERGED, mean, step
        batches = trainer.num_training_batches
        if isinstance(batches, int) and batches > 1:
            epochs = self.losses.by_epoch(values, batches)
            values = epochs if len(epochs) >= EPOCH_BLOCKS else values
        if len(values) < 3:
            return Status.WAITING, mean, step - self.rule.window
        trend = fit_trend(values)
        return (Status.PLATEAU if self.rule.check(step, trend) else Status.WAITING), trend.mean, step - self.rule.window

    def fit_within(self, epochs: int, trainer: Any) -> None:
        """Look back over at most the steps that ``epochs`` epochs of ``trainer`` hold, plus one (a
        full batch takes a step an epoch: 500 steps would be 500 epochs); a stream keeps its window.
        Under manual optimization a batch is counted as one step (the steps a batch are not known yet)."""
        batches = trainer.num_training_batches
        steps = epochs * math.ceil(batches / trainer.accumulate_grad_batches) + 1 if math.isfinite(batches) else 0
        if 3 <= steps < self.rule.window:
            self.rule.window, self.rule.every = steps, max(1, steps // 10)
            self.losses.window = steps

    def state_dict(self) -> dict:
        return {**self.rule.state_dict(), "losses": self.losses.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state)
        self.losses.load_state_dict(state["losses"])
