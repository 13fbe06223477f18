"""BatchedTensorBoardLogger: what TensorBoard reads back is what Lightning's TensorBoardLogger writes."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from src.loggers import BatchedTensorBoardLogger


def scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def write(logger: TensorBoardLogger) -> str:
    logger.log_metrics({"train/loss": torch.tensor(0.25), "train/acc": 0.5, "epoch": 3}, step=7)
    logger.log_metrics({"grad_norm/layers.0": 1e-12, "lr": {"a": 0.1, "b": 0.2}}, step=8)
    logger.finalize("success")
    return logger.log_dir


@pytest.mark.parametrize("prefix", ["", "fold1"])
def test_tensorboard_reads_the_same_scalars_as_from_lightnings_logger(tmp_path, prefix):
    ours = scalars(write(BatchedTensorBoardLogger(tmp_path, name="batched", prefix=prefix)))
    lightnings = scalars(write(TensorBoardLogger(tmp_path, name="lightning", prefix=prefix)))
    assert ours == lightnings
    assert ours[f"{prefix}-train/loss" if prefix else "train/loss"] == [(7, 0.25)]


def test_all_scalars_of_a_call_are_one_event(tmp_path):
    logger = BatchedTensorBoardLogger(tmp_path)
    logger.log_metrics({f"grad_norm/layers.{i}": float(i) for i in range(9)}, step=1)
    logger.finalize("success")
    assert len(scalars(logger.log_dir)) == 9
    (path,) = tmp_path.rglob("events.out.tfevents.*")
    records = [r for r in EventFileLoader(str(path)).Load() if r.summary.value]
    assert [len(r.summary.value) for r in records] == [9]  # one record, not 9


def test_a_value_that_is_not_a_number_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot log note='high'"):
        BatchedTensorBoardLogger(tmp_path).log_metrics({"note": "high"}, step=0)


def test_histograms_written_as_one_event_read_back_as_tensorboards_own(tmp_path):
    from src.callbacks.layer_stats import histogram

    values = torch.linspace(-1, 1, 101)
    ours = BatchedTensorBoardLogger(tmp_path, name="batched")
    ours.log_histograms({"hist_weight/a": histogram(values), "hist_weight/b": histogram(values * 2)}, step=4)
    ours.finalize("success")
    events = EventAccumulator(ours.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert sorted(events.Tags()["histograms"]) == ["hist_weight/a", "hist_weight/b"]
    (a,) = events.Histograms("hist_weight/a")
    assert a.step == 4 and a.histogram_value.num == 101 and sum(a.histogram_value.bucket) == 101
    assert (
        a.histogram_value.max == pytest.approx(1.0) and events.Histograms("hist_weight/b")[0].histogram_value.max == 2
    )
    (path,) = tmp_path.rglob("events.out.tfevents.*")
    assert [len(r.summary.value) for r in EventFileLoader(str(path)).Load() if r.summary.value] == [2]  # one event
