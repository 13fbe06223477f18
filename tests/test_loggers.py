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
