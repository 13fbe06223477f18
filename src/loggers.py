"""Lightning's ``TensorBoardLogger``, writing the scalars of one ``log_metrics`` call as one event."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from torch import Tensor
from typing_extensions import override

from src.callbacks.layer_stats import Histogram


class BatchedTensorBoardLogger(TensorBoardLogger):
    """A ``TensorBoardLogger`` whose ``log_metrics`` writes one event per call, not one per scalar.

    Lightning's logger calls ``SummaryWriter.add_scalar`` for each metric: one event record each,
    and TensorBoard's writer checksums every record in pure Python on its writer thread, which
    costs ~0.1 ms per record on a 2-core machine, as much as a full-batch toy step. A per-layer
    gradient-norm call (9 scalars for the default net) then costs ~1 ms; written as one event with
    9 values it costs ~0.15 ms. TensorBoard reads both the same way: the same tags, steps and values
    (``tests/test_loggers.py`` reads them back); dict values go to ``add_scalars`` as before.

    Everything else is Lightning's: the run directory, ``hparams.yaml``, the flush after each
    epoch's metrics (``save``), ``log_hyperparams``.
    """

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        values = []
        for key, value in self._add_prefix(metrics).items():
            if isinstance(value, Tensor):
                value = value.item()
            if isinstance(value, dict):
                self.experiment.add_scalars(key, value, step)
                continue
            try:
                values.append(Summary.Value(tag=key, simple_value=float(value)))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{type(self).__name__}: cannot log {key}={value!r}: not a number") from err
        if values:
            # The file writer every SummaryWriter.add_* uses (re-opened if the writer was closed).
            self.experiment._get_file_writer().add_summary(Summary(value=values), step)

    @rank_zero_only
    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        """Write several histograms (``LayerStatsMonitor``'s) as one event, as ``log_metrics`` does scalars."""
        values = [
            Summary.Value(
                tag=tag,
                histo=HistogramProto(
                    min=h.min,
                    max=h.max,
                    num=h.num,
                    sum=h.sum,
                    sum_squares=h.sum_squares,
                    bucket_limit=h.bucket_limits,
                    bucket=h.bucket_counts,
                ),
            )  # fmt: skip
            for tag, h in self._add_prefix(histograms).items()
        ]
        if values:
            self.experiment._get_file_writer().add_summary(Summary(value=values), step)

    def _add_prefix(self, metrics: Mapping[str, Any]) -> Mapping[str, Any]:
        if not self._prefix:
            return metrics
        return {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}": value for key, value in metrics.items()}
