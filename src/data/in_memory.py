"""Datasets that live in memory as tensors and are served a whole batch at a time.

A DataLoader over ``InMemoryDataset`` asks for a batch with one ``__getitems__(indices)`` call, so
a batch is one tensor index (plus an optional vectorised transform), never per-sample Python.
The DataLoader stays a plain ``torch.utils.data.DataLoader``: Lightning can still swap its sampler
for a ``DistributedSampler`` under DDP, and each rank then indexes its own shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

Batch = tuple[torch.Tensor, ...]


class InMemoryDataset(Dataset):
    """Equal-length tensors (features first) indexed together; ``transform`` maps a batch of features."""

    def __init__(self, *tensors: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("InMemoryDataset needs at least one tensor, all of the same length")
        self.tensors = tensors
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long)
        features, *rest = (t[index] for t in self.tensors)
        if self.transform is not None:
            features = self.transform(features)
        return (features, *rest)

    def __getitem__(self, index: int) -> Batch:
        return tuple(t[0] for t in self.__getitems__([index]))


def keep_batch(batch: Batch) -> Batch:
    """The DataLoader's ``collate_fn``: ``__getitems__`` already returns a collated batch."""
    return batch


def per_device_batch_size(global_batch_size: int | None, dataset_size: int, world_size: int) -> int:
    """The batch each process loads so that all processes together see ``global_batch_size``.

    ``None`` means full batch: each process takes its whole shard of the dataset.
    """
    if global_batch_size is None:
        return max(1, -(-dataset_size // world_size))
    if global_batch_size % world_size:
        raise ValueError(
            f"data.batch_size={global_batch_size} is the global batch and cannot be split evenly across "
            f"{world_size} processes: use a multiple of {world_size}"
        )
    return global_batch_size // world_size


class InMemoryDataModule(L.LightningDataModule):
    """Base for the DataModules here: subclasses fill ``train_set``/``val_set``/``test_set`` in ``setup``.

    ``batch_size`` is the global batch over all processes (``None``: full batch); under DDP each
    process loads ``batch_size / world_size`` samples from its own shard.
    """

    in_features: int
    num_classes: int

    def __init__(self, batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1 or null (full batch), got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: InMemoryDataset | None = None
        self.val_set: InMemoryDataset | None = None
        self.test_set: InMemoryDataset | None = None

    def _loader(self, dataset: InMemoryDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been run")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            dataset,
            batch_size=per_device_batch_size(self.batch_size, len(dataset), world_size),
            # Shuffling a full batch only reorders a sum: skip it, so full-batch runs are reproducible.
            shuffle=shuffle and self.batch_size is not None,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
