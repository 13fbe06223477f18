"""What a study (and the benchmarks) note about a run while it trains, apart from its logs."""

from __future__ import annotations

import lightning as L
from typing_extensions import override


class FirstEpochBelow(L.Callback):
    """Notes the first training epoch whose ``metric`` is below ``threshold`` (``epoch``; ``None`` until then).

    Example::

        probe = FirstEpochBelow("train/loss", 0.05)
        Trainer(callbacks=[probe]).fit(model, data)
        print(probe.epoch)
    """

    def __init__(self, metric: str, threshold: float) -> None:
        self.metric, self.threshold = metric, threshold
        self.epoch: int | None = None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if self.epoch is None and value is not None and float(value) < self.threshold:
            self.epoch = trainer.current_epoch
