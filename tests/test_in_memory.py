"""The in-memory fast path: batch-at-a-time indexing that honours the sampler Lightning injects."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from src.data.in_memory import InMemoryDataModule, InMemoryDataset, keep_batch, per_device_batch_size


def test_getitems_indexes_all_tensors_and_transforms_features_once():
    calls = []

    def double(x):
        calls.append(x.shape)
        return 2 * x

    ds = InMemoryDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10), transform=double)
    x, y = ds.__getitems__([7, 2, 5])
    assert x.squeeze(1).tolist() == [14.0, 4.0, 10.0] and y.tolist() == [7, 2, 5]
    assert calls == [(3, 1)]
    assert [t.tolist() for t in ds[4]] == [[8.0], 4]


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        InMemoryDataset(torch.zeros(3), torch.zeros(4))


def test_global_batch_is_divided_by_world_size_or_rejected():
    assert per_device_batch_size(100, 60000, 4) == 25
    assert per_device_batch_size(None, 21, 2) == 11
    with pytest.raises(ValueError, match="data.batch_size=100 .* 3 processes"):
        per_device_batch_size(100, 60000, 3)


def test_injected_distributed_sampler_gives_each_rank_a_disjoint_shard():
    ds = InMemoryDataset(torch.arange(40.0).unsqueeze(1), torch.arange(40))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True, collate_fn=keep_batch)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        # what Lightning does to a user's DataLoader under DDP
        distributed = _update_dataloader(loader, sampler=sampler)
        labels = torch.cat([y for _, y in distributed]).tolist()
        assert len(labels) == 20
        assert sorted(labels) == sorted(sampler)  # the rank served exactly its sampler's indices
        shards.append(set(labels))
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(40))


def test_datamodule_rejects_bad_batch_settings():
    with pytest.raises(ValueError, match="batch_size"):
        InMemoryDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        InMemoryDataModule(num_workers=-1)
