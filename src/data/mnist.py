"""MNIST and Fashion-MNIST through torchvision, served from memory as uint8 tensors.

torchvision parses the IDX files once into ``.data`` (uint8, N x 28 x 28) and ``.targets``. Batches
are then one tensor index each (``InMemoryDataset``); the conversion to float, the normalisation
and the flattening happen per batch, vectorised, in ``on_after_batch_transfer``, i.e. on the device
the model runs on, so a GPU receives 1 byte per pixel rather than 4. No PIL image or ``ToTensor``
is made in the training loop.

Getting the files, in order:

1. already in ``data_dir/<MNIST|FashionMNIST>/raw/`` (torchvision's layout): used as they are;
2. ``raw_dir``: a folder with the four IDX ``.gz`` files (e.g. Debian's ``dataset-fashion-mnist``
   in ``/usr/share/datasets/fashion-mnist``) is verified and unpacked into that layout, offline;
3. ``download``: torchvision downloads them (``mirror`` replaces its mirrors, e.g. a local copy).

A failed import or download removes what it wrote, so a retry starts clean.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torchvision import datasets
from torchvision.datasets.utils import calculate_md5

from src.data.dnnex import DataFileError
from src.data.in_memory import InMemoryDataModule, InMemoryDataset

Dataset = Literal["mnist", "fashion_mnist"]
TORCHVISION_CLASSES: dict[str, type[datasets.MNIST]] = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}

# MD5 of the unpacked IDX files, as torchvision's MNIST classes once listed them (``raw_data``).
# torchvision's ``resources`` hold the MD5 of the original ``.gz`` files; Debian re-compresses them
# (other bytes, the same content), so an import accepts a ``.gz`` whose MD5 or unpacked MD5 matches.
UNPACKED_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
# Pixel mean and std of each training set (60k images, values in [0, 1]).
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}
IDX_MAGIC = {"images": (0x00000803, 3), "labels": (0x00000801, 1)}


def raw_folder(dataset: str, data_dir: str | Path) -> Path:
    """Where torchvision looks for the unpacked IDX files: ``data_dir/<class name>/raw``."""
    return Path(data_dir) / TORCHVISION_CLASSES[dataset].__name__ / "raw"


def unpacked_names(dataset: str) -> list[str]:
    return [name.removesuffix(".gz") for name, _ in TORCHVISION_CLASSES[dataset].resources]


def missing_files(dataset: str, data_dir: str | Path) -> list[str]:
    return [name for name in unpacked_names(dataset) if not (raw_folder(dataset, data_dir) / name).is_file()]


def idx_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` is not an IDX file of ``kind`` (images/labels), or ``None`` if its header and size fit."""
    magic, ndim = IDX_MAGIC[kind]
    try:
        with open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
        size = path.stat().st_size
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if len(header) < 4 + 4 * ndim or int.from_bytes(header[:4], "big") != magic:
        return f"is not an IDX {kind} file (wrong header)"
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = len(header) + int(torch.tensor(dims).prod())
    if size != expected:
        return f"is truncated or padded: {size} bytes, its header promises {expected}"
    if kind == "images" and dims[1:] != [28, 28]:
        return f"holds {dims[1]}x{dims[2]} images, expected 28x28"
    return None


def _unpack(source: Path, target: Path) -> None:
    """Write the (gunzipped) content of ``source`` to ``target`` through a temporary file and a rename."""
    opener = gzip.open if source.suffix == ".gz" else open
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, opener(source, "rb") as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_raw(dataset: str, raw_dir: str | Path, data_dir: str | Path) -> None:
    """Verify the four IDX files in ``raw_dir`` and unpack them into torchvision's layout under ``data_dir``.

    Each file may be the original ``.gz`` (checked against torchvision's MD5), a re-compressed one
    or an unpacked one (checked by the MD5 of its content). Nothing is left behind on failure.
    """
    raw_dir = Path(raw_dir).expanduser()
    if not raw_dir.is_dir():
        raise DataFileError(
            f"data.raw_dir={str(raw_dir)!r} is not a folder; point it at the folder holding the IDX .gz files"
        )
    sources = {}
    for gz_name, _ in TORCHVISION_CLASSES[dataset].resources:
        name = gz_name.removesuffix(".gz")
        found = [p for p in (raw_dir / gz_name, raw_dir / name) if p.is_file()]
        if not found:
            wanted = ", ".join(g for g, _ in TORCHVISION_CLASSES[dataset].resources)
            raise DataFileError(f"{raw_dir / gz_name}: missing; data.raw_dir must hold {wanted}")
        sources[name] = found[0]
    target_dir = raw_folder(dataset, data_dir)
    created_dir = not target_dir.exists()
    target_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        gz_md5 = dict(TORCHVISION_CLASSES[dataset].resources)
        for name, source in sources.items():
            target = target_dir / name
            if target.is_file():
                continue
            original_gz = source.suffix == ".gz" and calculate_md5(source) == gz_md5[source.name]
            try:
                _unpack(source, target)
            except (OSError, EOFError, gzip.BadGzipFile) as err:
                raise DataFileError(f"{source}: cannot be unpacked ({err}); is it a gzipped IDX file?") from None
            written.append(target)
            if not original_gz and calculate_md5(target) != UNPACKED_MD5[dataset][name]:
                raise DataFileError(
                    f"{source}: content does not match torchvision's checksum for {dataset} {name}; "
                    "is it the right (undamaged) file?"
                )
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created_dir:
            shutil.rmtree(target_dir.parent, ignore_errors=True)
        raise


def download(dataset: str, data_dir: str | Path, mirror: str | None = None) -> None:
    """torchvision's download, removing every file it wrote when it fails (no network, bad mirror)."""
    cls = TORCHVISION_CLASSES[dataset]
    if mirror is not None:
        # Same class name, so torchvision's folder layout is unchanged.
        cls = type(cls.__name__, (cls,), {"mirrors": [mirror.rstrip("/") + "/"]})
    target_dir = raw_folder(dataset, data_dir)
    class_dir = target_dir.parent
    created_dir = not class_dir.exists()
    before = set(target_dir.iterdir()) if target_dir.is_dir() else set()
    try:
        downloader = cls.__new__(cls)  # download() needs only root; __init__ would also parse the files
        downloader.root = os.path.expanduser(str(data_dir))
        downloader.download()
    except BaseException as err:
        for path in set(target_dir.iterdir()) - before if target_dir.is_dir() else ():
            path.unlink(missing_ok=True)
        if created_dir:
            shutil.rmtree(class_dir, ignore_errors=True)
        if isinstance(err, Exception):
            files = ", ".join(name for name, _ in cls.resources)
            raise DataFileError(
                f"could not download {dataset} into {target_dir} ({_last_line(err)}): with no network, put "
                f"{files} in a folder and set data.raw_dir to it (or put the unpacked files in {target_dir})"
            ) from None
        raise


def _last_line(err: BaseException) -> str:
    """torchvision lists one error per mirror over several lines; the last one says what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class MNISTDataModule(InMemoryDataModule):
    """MNIST or Fashion-MNIST (28x28 grey images, 10 classes), flattened to 784 features.

    The validation set is ``val_size`` images carved from the 60k training set by a seeded
    permutation; the test set is the official 10k test set. Batches hold uint8 images and int64
    labels; ``on_after_batch_transfer`` turns the images into normalised float rows
    ``(x / 255 - mean) / std`` on the model's device, so anything that reads the loaders outside a
    Trainer gets the raw uint8 images.

    Args:
        dataset: ``mnist`` or ``fashion_mnist``.
        data_dir: Root of torchvision's layout: files go to ``data_dir/MNIST/raw`` or ``data_dir/FashionMNIST/raw``.
        download: Let torchvision download missing files (needs the internet).
        raw_dir: A folder holding the four IDX ``.gz`` files to import offline instead of downloading;
            they are verified by checksum and unpacked into ``data_dir``.
        mirror: Base URL to download from instead of torchvision's mirrors.
        val_size: Training images held out for validation (0: no validation).
        seed: Seed of the train/validation split.
        batch_size: Global batch size (divided across DDP processes); ``null`` for full batch.
        num_workers: DataLoader workers; 0 is fastest, a batch is a single tensor index.
        normalize: Standardise pixels with the dataset's mean and std; if false, scale to [0, 1] only.
    """

    in_features = 28 * 28
    num_classes = 10

    def __init__(
        self,
        dataset: Dataset = "mnist",
        data_dir: str = "data",
        download: bool = True,
        raw_dir: str | None = None,
        mirror: str | None = None,
        val_size: NonNegativeInt = 5000,
        seed: int = 0,
        batch_size: PositiveInt | None = 100,
        num_workers: NonNegativeInt = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if dataset not in TORCHVISION_CLASSES:
            raise ValueError(f"data.dataset must be one of {', '.join(TORCHVISION_CLASSES)}, got {dataset!r}")
        self.dataset = dataset
        self.data_dir = data_dir
        self.download = download
        self.raw_dir = raw_dir
        self.mirror = mirror
        self.val_size = val_size
        self.seed = seed
        self.normalize = normalize
        self.mean, self.std = NORMALIZATION[dataset] if normalize else (0.0, 1.0)

    @property
    def raw_folder(self) -> Path:
        return raw_folder(self.dataset, self.data_dir)

    def prepare_data(self) -> None:
        """Make the unpacked files exist (import from ``raw_dir`` or download); runs on one process per node."""
        if not missing_files(self.dataset, self.data_dir):
            return
        if self.raw_dir is not None:
            import_raw(self.dataset, self.raw_dir, self.data_dir)
        elif self.download:
            download(self.dataset, self.data_dir, self.mirror)
        else:
            raise DataFileError(self._missing_message())

    def _missing_message(self) -> str:
        names = ", ".join(missing_files(self.dataset, self.data_dir))
        return (
            f"{self.dataset} files missing in {self.raw_folder}: {names}; set data.download=true, or data.raw_dir "
            "to a folder holding the IDX .gz files"
        )

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if missing_files(self.dataset, self.data_dir):
            raise DataFileError(self._missing_message())
        try:
            ds = TORCHVISION_CLASSES[self.dataset](self.data_dir, train=train, download=False)
            data, targets = ds.data, ds.targets
        except Exception as err:
            split = "train" if train else "t10k"
            for kind in ("images", "labels"):
                path = self.raw_folder / f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
                problem = idx_problem(path, kind)
                if problem is not None:
                    raise DataFileError(f"{path} {problem}; delete it and run again to fetch it anew") from None
            raise DataFileError(f"{self.raw_folder}: torchvision cannot read the {split} files ({err})") from None
        if len(data) != len(targets):
            raise DataFileError(
                f"{self.raw_folder}: {len(data)} images but {len(targets)} labels in the "
                f"{'train' if train else 't10k'} files; delete them and run again"
            )
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < self.num_classes:
            raise DataFileError(f"{self.raw_folder}: labels outside 0..9; delete the files and run again")
        return data, targets

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self._load(train=True)
        if self.val_size >= len(images):
            raise ValueError(f"data.val_size={self.val_size} leaves no training images (there are {len(images)})")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val_index, train_index = order[: self.val_size], order[self.val_size :]
        self.train_set = InMemoryDataset(images[train_index], labels[train_index])
        self.val_set = InMemoryDataset(images[val_index], labels[val_index]) if self.val_size else None
        self.test_set = InMemoryDataset(*self._load(train=False))

    def val_dataloader(self) -> Any:
        return [] if self.val_size == 0 else super().val_dataloader()

    def to_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(N, 28, 28)`` -> normalised float rows ``(N, 784)``, in one vectorised pass."""
        return images.flatten(1).float().sub_(255 * self.mean).div_(255 * self.std)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, *rest = batch
        if images.dtype == torch.uint8:
            images = self.to_features(images)
        return (images, *rest)
