"""MNIST / Fashion-MNIST: torchvision's parsing on IDX files written here, offline import, the fast path."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from src.data import DataFileError, InMemoryDataset, MNISTDataModule
from src.data.mnist import NORMALIZATION, import_raw, raw_folder
from src.models import MLPClassifier
from tests.helpers import REPO, SHARED_DATA, quiet_trainer, run_cli

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
MNIST_T10K = SHARED_DATA / "mnist-t10k"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 8, ndim), big-endian dims, then the data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, n: int, seed: int, gz: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(array)
        name = f"{split}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images, labels


@pytest.fixture
def tiny_mnist(tmp_path):
    """120 training and 30 test images in torchvision's layout under ``tmp_path / 'data'``."""
    raw = raw_folder("mnist", tmp_path / "data")
    train = write_split(raw, "train", 120, seed=0)
    test = write_split(raw, "t10k", 30, seed=1)
    return tmp_path / "data", train, test


def test_torchvision_parses_the_files_and_the_split_is_seeded(tiny_mnist):
    data_dir, (train_images, train_labels), (test_images, test_labels) = tiny_mnist
    dm = MNISTDataModule(data_dir=str(data_dir), download=False, val_size=20, seed=5, batch_size=10)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = dm.train_set.tensors
    assert images.dtype == torch.uint8 and images.shape == (100, 28, 28) and len(dm.val_set) == 20
    # train + val is a permutation of the file's images, paired with their labels
    all_images = torch.cat([images, dm.val_set.tensors[0]]).flatten(1)
    all_labels = torch.cat([labels, dm.val_set.tensors[1]])
    order = [int(np.where((train_images.reshape(120, -1) == row.numpy()).all(1))[0][0]) for row in all_images]
    assert sorted(order) == list(range(120))
    assert all_labels.tolist() == train_labels[order].tolist()
    assert torch.equal(dm.test_set.tensors[0], torch.from_numpy(test_images))
    assert torch.equal(dm.test_set.tensors[1], torch.from_numpy(test_labels).long())
    again = MNISTDataModule(data_dir=str(data_dir), download=False, val_size=20, seed=5)
    again.setup()
    assert torch.equal(again.val_set.tensors[0], dm.val_set.tensors[0])
    other = MNISTDataModule(data_dir=str(data_dir), download=False, val_size=20, seed=6)
    other.setup()
    assert not torch.equal(other.val_set.tensors[0], dm.val_set.tensors[0])


def test_batches_are_uint8_tensor_indexed_and_normalised_after_transfer(tiny_mnist, monkeypatch):
    data_dir = tiny_mnist[0]
    dm = MNISTDataModule(data_dir=str(data_dir), download=False, val_size=20, batch_size=25)
    dm.setup("fit")

    def per_sample(*args):
        raise AssertionError("a batch must be one __getitems__ call, not per-sample __getitem__")

    monkeypatch.setattr(InMemoryDataset, "__getitem__", per_sample)
    batches = list(dm.train_dataloader())
    assert [len(b[0]) for b in batches] == [25] * 4
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (25, 28, 28) and labels.dtype == torch.int64
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    mean, std = NORMALIZATION["mnist"]
    assert x.dtype == torch.float32 and x.shape == (25, 784) and torch.equal(y, labels)
    assert torch.allclose(x, (images.reshape(25, -1).float() / 255 - mean) / std, atol=1e-5)
    unnormalised = MNISTDataModule(data_dir=str(data_dir), normalize=False)
    assert torch.allclose(unnormalised.to_features(images), images.reshape(25, -1).float() / 255)


def test_the_sampler_lightning_injects_gives_each_rank_a_disjoint_shard(tiny_mnist):
    dm = MNISTDataModule(data_dir=str(tiny_mnist[0]), download=False, val_size=20, batch_size=10)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        # What Lightning does under DDP: rebuild the DataLoader around a DistributedSampler.
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sharded = _update_dataloader(loader, sampler)
        labels = torch.cat([batch[1] for batch in sharded])
        indices = list(sampler)
        assert torch.equal(labels, dm.train_set.tensors[1][indices])
        seen.append(set(indices))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(dm.train_set)


def test_missing_files_without_download_say_which_and_where(tmp_path):
    dm = MNISTDataModule(dataset="fashion_mnist", data_dir=str(tmp_path / "d"), download=False)
    with pytest.raises(DataFileError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "FashionMNIST/raw" in message and "train-images-idx3-ubyte" in message and "raw_dir" in message


@pytest.mark.parametrize("damage", ["truncated", "wrong header"])
def test_a_damaged_idx_file_is_named(tiny_mnist, damage):
    data_dir = tiny_mnist[0]
    path = raw_folder("mnist", data_dir) / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncated" else b"\x00\x00\x09\x09" + data[4:])
    dm = MNISTDataModule(data_dir=str(data_dir), download=False)
    with pytest.raises(DataFileError) as err:
        dm.setup()
    assert str(path) in str(err.value) and ("truncated" if damage == "truncated" else "not an IDX") in str(err.value)


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason=f"{MNIST_T10K} (real MNIST test digits) is not there")
def test_import_checks_files_and_leaves_nothing_behind_on_failure(tmp_path):
    raw_dir, data_dir = tmp_path / "raw", tmp_path / "data"
    raw_dir.mkdir()
    for name in FILES[2:]:
        shutil.copy(MNIST_T10K / f"{name}.gz", raw_dir)
    with pytest.raises(DataFileError, match="train-images-idx3-ubyte.gz: missing"):
        import_raw("mnist", raw_dir, data_dir)
    # plausible training files with the wrong content: rejected by checksum, nothing written
    write_split(raw_dir, "train", 50, seed=0, gz=True)
    with pytest.raises(DataFileError, match="does not match torchvision's checksum"):
        import_raw("mnist", raw_dir, data_dir)
    assert not data_dir.exists() or not any(data_dir.rglob("*"))
    (raw_dir / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataFileError, match="cannot be unpacked"):
        import_raw("mnist", raw_dir, data_dir)
    assert not data_dir.exists() or not any(data_dir.rglob("*"))


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason=f"{MNIST_T10K} (real MNIST test digits) is not there")
def test_real_digits_are_parsed_by_torchvision(tmp_path):
    raw = raw_folder("mnist", tmp_path)
    raw.mkdir(parents=True)
    for name in FILES[2:]:
        (raw / name).write_bytes(gzip.decompress((MNIST_T10K / f"{name}.gz").read_bytes()))
    write_split(raw, "train", 10, seed=0)  # only the test split is real
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False, val_size=0)
    dm.setup("test")
    images, labels = dm.test_set.tensors
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # normalised with MNIST's training mean/std, the test digits come out near mean 0 and std 1
    x = dm.to_features(images)
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05
    assert dm.val_dataloader() == []


def test_failed_download_leaves_nothing_behind_and_a_retry_works(tmp_path, http_dir):
    http_dir.directory.joinpath("train-images-idx3-ubyte.gz").write_bytes(b"corrupt")  # fetched, fails the checksum
    data_dir = tmp_path / "data"
    dm = MNISTDataModule(data_dir=str(data_dir), mirror=http_dir.url)
    with pytest.raises(DataFileError) as err:
        dm.prepare_data()
    assert "could not download mnist" in str(err.value) and "raw_dir" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (data_dir / "MNIST").exists()
    # the retry, offline from files the user put in place
    raw = raw_folder("mnist", data_dir)
    write_split(raw, "train", 30, seed=0)
    write_split(raw, "t10k", 10, seed=1)
    MNISTDataModule(data_dir=str(data_dir), mirror=http_dir.url, val_size=10).setup()


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_config_reaches_84_percent_test_accuracy_in_two_epochs(tmp_path):
    """The real data through the fast path: full 60k Fashion-MNIST, imported offline, 2 epochs."""
    result = run_cli(
        "fit", "--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false", "--data.init_args.data_dir", str(tmp_path / "data"),
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    model = MLPClassifier.load_from_checkpoint(ckpt)
    dm = MNISTDataModule("fashion_mnist", data_dir=str(tmp_path / "data"), download=False)
    (metrics,) = quiet_trainer().test(model, datamodule=dm, verbose=False)
    assert metrics["test/acc"] >= 0.84, metrics
