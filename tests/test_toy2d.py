"""The toy 2-D data: deterministic from a seed, the right shapes and balance."""

from __future__ import annotations

import pytest
import torch

from src.data import Toy2DDataModule
from src.data.toy2d import make_toy2d


def setup_data(**kwargs) -> Toy2DDataModule:
    dm = Toy2DDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_same_seed_same_data_and_different_seed_different_data():
    a, b, c = setup_data(seed=3), setup_data(seed=3), setup_data(seed=4)
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], a.val_set.tensors[0])


def test_two_clusters_match_the_source_experiment():
    x, y = make_toy2d("two_clusters", 2000, torch.Generator().manual_seed(0))
    assert x.shape == (2000, 2) and y.shape == (2000,)
    assert (y == 1).sum() == (y == 0).sum() == 1000
    torch.testing.assert_close(x[y == 1].mean(0), torch.tensor([0.0, 8.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(x[y == 0].mean(0), torch.tensor([8.0, 0.0]), atol=0.1, rtol=0)
    assert x[y == 1].std(0).tolist() == pytest.approx([1.0, 1.0], abs=0.1)


def test_default_is_twenty_points_balanced_and_full_batch():
    dm = setup_data()
    x, y = dm.train_set.tensors
    assert x.shape == (20, 2) and int(y.sum()) == 10
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (20, 2) and batch[1].shape == (20,)


def test_blobs_have_four_classes_with_tight_clusters():
    dm = setup_data(variant="blobs", n_samples=400)
    x, y = dm.train_set.tensors
    assert dm.num_classes == 4 and sorted(y.unique().tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(x[y == 3].mean(0), torch.tensor([-2.0, 4.0]), atol=0.15, rtol=0)
    assert x[y == 3].std(0).max().item() < 0.65


def test_xor_labels_opposite_corners_alike():
    x, y = make_toy2d("xor", 400, torch.Generator().manual_seed(0))
    corner = (x > 4).long()
    assert torch.equal(y, corner[:, 0] ^ corner[:, 1])


def test_mini_batches_come_from_tensor_indexing():
    dm = setup_data(n_samples=20, batch_size=8)
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [8, 8, 4]
    seen = torch.cat([b[0] for b in batches])
    assert sorted(seen[:, 0].tolist()) == sorted(dm.train_set.tensors[0][:, 0].tolist())


def test_too_few_samples_for_the_clusters_is_rejected():
    with pytest.raises(ValueError, match="n_samples"):
        setup_data(variant="blobs", n_samples=3)


def test_xor4_is_the_labs_four_points_without_noise():
    dm = Toy2DDataModule(variant="xor4", n_samples=4, val_samples=4)
    dm.setup("fit")
    x, y = dm.train_set.tensors[:2]
    assert x.tolist() == [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]] and y.tolist() == [0, 1, 1, 0]
    assert torch.equal(dm.val_set.tensors[0], x) and dm.num_classes == 2
