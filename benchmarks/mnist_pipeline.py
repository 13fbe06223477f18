"""One MNIST-sized training epoch four ways, and the peak memory of a Fashion-MNIST fit.

    python -m benchmarks.mnist_pipeline [--repeats 3] [--json out.json] [--accelerator gpu]

Rows (784-256-256-10 ReLU MLP, Adam 1e-3, batch 100, one epoch over the 55k training images):

- template:    ``Trainer.fit`` with ``MNISTDataModule`` (uint8 in memory, one tensor index per
               batch, normalised per batch after transfer), no validation or logger (the model
               still computes and logs its metrics);
- bare Trainer: ``Trainer.fit`` of a minimal LightningModule (the same MLP, loss and Adam, no
               metrics or logging) over the plain loop's tensors: what Lightning's loop itself costs;
- plain loop:  a hand-written PyTorch loop over pre-normalised float tensors in memory (it sums
               the epoch's loss and correct predictions, as the template logs both);
- torchvision: a hand-written loop over torchvision's ``FashionMNIST`` dataset with
               ``ToTensor`` + ``Normalize`` and a standard ``DataLoader`` (what the source code does);
- data only:   the two data paths iterated without a model (what the data path itself costs).

With ``--accelerator gpu`` every row trains on the GPU (the plain loop's tensors live there; the
data paths end with their batches there), and the template runs once more with
``configs/trainer/gpu.yaml``'s ``bf16-mixed`` precision. ``--no-torchvision`` leaves out the two
torchvision rows.

The rows are run interleaved, ``--repeats`` times each; the table gives the median samples/s and
the spread (min-max), in wall time and in the process's CPU time (every row runs in this one
process, without DataLoader workers). A ratio in CPU time that differs from the wall-time ratio
means one side waits or uses fewer cores (torchvision's per-image transforms run on one); on a
shared VM both move together, as the cores' speed drifts. The data is Fashion-MNIST from
Debian's package when it is installed, otherwise random images of the same shapes. Peak RSS is
the high-water mark of a separate ``python -m src.train fit --config configs/fashion_mnist.yaml``
process (1 epoch), read inside that process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchvision import datasets, transforms

from src.callbacks import LayerStatsMonitor
from src.data.in_memory import InMemoryDataset, keep_batch
from src.data.mnist import NORMALIZATION, MNISTDataModule, raw_folder
from src.models import MLPClassifier

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def prepare(data_dir: Path) -> tuple[MNISTDataModule, str]:
    """Fashion-MNIST from Debian if present, else random IDX files of MNIST's shapes."""
    if DEBIAN.is_dir():
        dm = MNISTDataModule("fashion_mnist", data_dir=str(data_dir), raw_dir=str(DEBIAN))
        source = f"Fashion-MNIST from {DEBIAN}"
    else:
        raw = raw_folder("fashion_mnist", data_dir)
        raw.mkdir(parents=True)
        gen = torch.Generator().manual_seed(0)
        for split, n in (("train", 60000), ("t10k", 10000)):
            images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
            labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=gen)
            for kind, tensor in (("images-idx3", images), ("labels-idx1", labels)):
                header = bytes([0, 0, 8, tensor.ndim]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
                (raw / f"{split}-{kind}-ubyte").write_bytes(header + tensor.numpy().tobytes())
        dm = MNISTDataModule("fashion_mnist", data_dir=str(data_dir), download=False)
        source = "random images of Fashion-MNIST's shapes (Debian's dataset-fashion-mnist is not installed)"
    dm.prepare_data()
    dm.setup("fit")
    return dm, source


def new_model() -> MLPClassifier:
    return MLPClassifier(in_features=784, num_classes=10, depth=3, width=256, activation="relu")


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, totals: torch.Tensor
) -> None:
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # the epoch's loss and accuracy, which the template logs too
        totals[0] += loss * len(y)
        totals[1] += (logits.argmax(-1) == y).sum()


def run_template(
    dm: MNISTDataModule,
    accelerator: str = "cpu",
    precision: str = "32-true",
    layers: str | None = None,
    log_dir: Path | None = None,
) -> int:
    """One epoch of the template's model; ``layers``: with a TensorBoard logger (``"logger"``), and with
    ``LayerStatsMonitor`` at its default rates (``"default"``) or without histograms (``"no histograms"``)."""
    model = new_model()
    model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-3)
    histograms = 0 if layers == "no histograms" else None
    callbacks = [] if layers in (None, "logger") else [LayerStatsMonitor(histogram_every_n_steps=histograms)]
    logger = TensorBoardLogger(log_dir, default_hp_metric=False) if layers is not None else False
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=1, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return len(dm.train_set)


class BareMLP(L.LightningModule):
    """The benchmark's MLP, loss and Adam as a minimal LightningModule: no metrics, no logging."""

    def __init__(self) -> None:
        super().__init__()
        self.net = new_model().net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def run_bare(dm: MNISTDataModule, accelerator: str = "cpu") -> int:
    """Lightning's floor: a bare ``Trainer.fit`` over the plain loop's pre-normalised tensors."""
    images, labels = dm.train_set.tensors
    dataset = InMemoryDataset(dm.to_features(images), labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=100, shuffle=True, collate_fn=keep_batch)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(BareMLP(), train_dataloaders=loader)
    return len(dataset)


def run_plain(dm: MNISTDataModule, device: torch.device = CPU) -> int:
    images, labels = (t.to(device) for t in dm.train_set.tensors)
    x_all = dm.to_features(images)  # normalised once, up front, on the device: the loop only indexes
    model = new_model().net.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = torch.zeros(2, device=device)
    for index in torch.randperm(len(x_all), device=device).split(100):
        train_step(model, optimizer, x_all[index], labels[index], totals)
    return len(x_all)


def run_torchvision(data_dir: Path, n: int, device: torch.device = CPU) -> int:
    mean, std = NORMALIZATION["fashion_mnist"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    dataset = datasets.FashionMNIST(str(data_dir), train=True, transform=transform)
    subset = torch.utils.data.Subset(dataset, range(n))  # the same number of images as the other rows
    loader = torch.utils.data.DataLoader(subset, batch_size=100, shuffle=True)
    model = new_model().net.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = torch.zeros(2, device=device)
    for x, y in loader:
        train_step(model, optimizer, x.flatten(1).to(device), y.to(device), totals)
    return n


def load_template(dm: MNISTDataModule, device: torch.device = CPU) -> int:
    """The data path alone: the template's loader, the transfer and the per-batch normalisation, no model."""
    n = 0
    for images, labels in dm.train_dataloader():
        labels.to(device)
        n += len(dm.to_features(images.to(device)))
    return n


def load_torchvision(data_dir: Path, n: int, device: torch.device = CPU) -> int:
    """The data path alone: torchvision's dataset with ToTensor + Normalize through a DataLoader."""
    mean, std = NORMALIZATION["fashion_mnist"]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    dataset = torch.utils.data.Subset(datasets.FashionMNIST(str(data_dir), train=True, transform=transform), range(n))
    n = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=100, shuffle=True):
        labels.to(device)
        n += len(images.flatten(1).to(device))
    return n


# Runs ``python -m src.train ARGS`` and, as it exits, writes its own peak resident memory to stderr.
# The peak is read inside the process: getrusage(RUSAGE_CHILDREN) in the parent would report the
# parent's own peak instead whenever that is higher, since Linux carries the high-water mark of the
# memory a child replaces by exec() over into the child's ru_maxrss.
_REPORT_PEAK = """
import atexit, resource, runpy, sys

def report():
    try:
        with open("/proc/self/status") as status:  # this process's own high-water mark, in KiB
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS
    sys.stderr.write(f"\\npeak_rss_kib {kib}\\n")

atexit.register(report)
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""


def peak_rss_of_train(args: list[str], cwd: str | Path) -> float:
    """Peak resident memory (MiB) of a ``python -m src.train *args`` process, measured inside it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", _REPORT_PEAK, *args]
    result = subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    kib = next(line.split()[1] for line in reversed(result.stderr.splitlines()) if line.startswith("peak_rss_kib "))
    return int(kib) / 1024


def peak_rss_of_fit(data_dir: Path) -> float:
    """Peak resident memory (MiB) of a real 1-epoch Fashion-MNIST fit process."""
    args = [
        "fit", "--config", str(REPO / "configs" / "fashion_mnist.yaml"),
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.data_dir", str(data_dir), "--data.init_args.download", "false",
    ]  # fmt: skip
    if not DEBIAN.is_dir():
        args += ["--data.init_args.raw_dir", "null"]
    with tempfile.TemporaryDirectory() as cwd:
        return peak_rss_of_train(args, cwd)


def measure(argv: list[str] | None = None) -> dict:
    """Run the rows; returns ``{"source", "images", "samples_per_s": {row: [...]}, "cpu_samples_per_s":
    {row: [...]}, "peak_rss_mib"}`` (the first row is the template; rows named "data only" have no model)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory run")
    parser.add_argument("--limit", type=int, help="train on the first N images only (a quick check)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="where every row trains")
    parser.add_argument("--no-torchvision", action="store_true", help="leave out the torchvision rows")
    parser.add_argument("--layers", action="store_true", help="add the LayerStatsMonitor rows")
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu needs a CUDA device; none is visible to torch")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        dm, source = prepare(data_dir)
        if args.limit:
            dm.train_set.tensors = tuple(t[: args.limit] for t in dm.train_set.tensors)
        n = len(dm.train_set)
        where = "" if device.type == "cpu" else f" on {args.accelerator}"
        rows = {
            f"template (Trainer + MNISTDataModule){where}": lambda: run_template(dm, args.accelerator),
            "bare Trainer.fit: no metrics, no logging": lambda: run_bare(dm, args.accelerator),
            "plain loop over in-memory tensors": lambda: run_plain(dm, device),
            "torchvision Dataset + DataLoader + ToTensor": lambda: run_torchvision(data_dir, n, device),
            "data only: template loader + normalisation": lambda: load_template(dm, device),
            "data only: torchvision DataLoader + ToTensor": lambda: load_torchvision(data_dir, n, device),
        }
        if args.layers:  # what LayerStatsMonitor costs an epoch (each with a TensorBoard logger)
            for layers in ("logger", "no histograms", "default"):
                rows[f"template + TensorBoard, LayerStatsMonitor: {layers}"] = lambda layers=layers: run_template(
                    dm, args.accelerator, layers=layers, log_dir=data_dir / "logs"
                )
        if device.type == "cuda":  # configs/trainer/gpu.yaml's precision
            rows["template, bf16-mixed (configs/trainer/gpu.yaml)"] = lambda: run_template(dm, "gpu", "bf16-mixed")
        if args.no_torchvision:
            rows = {name: run for name, run in rows.items() if "torchvision" not in name}
        rates: dict[str, list[float]] = {name: [] for name in rows}
        cpu_rates: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, run in rows.items():
                torch.manual_seed(0)
                start, cpu_start = time.perf_counter(), time.process_time()
                samples = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the last kernels belong to this row
                cpu_rates[name].append(samples / (time.process_time() - cpu_start))
                rates[name].append(samples / (time.perf_counter() - start))
        rss = None if args.no_rss else peak_rss_of_fit(data_dir)
    figures = {
        "source": source,
        "images": n,
        "samples_per_s": rates,
        "cpu_samples_per_s": cpu_rates,
        "peak_rss_mib": rss,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


def ratios(figures: dict) -> list[tuple[str, float, float]]:
    """``(row, wall ratio, CPU-time ratio)``: the template's (or its loader's) median rate over the row's."""
    out = []
    for kind in ("samples_per_s", "cpu_samples_per_s"):
        medians = {name: statistics.median(values) for name, values in figures[kind].items()}
        template = next(iter(medians.values()))
        loader = next(rate for name, rate in medians.items() if name.startswith("data only"))
        out.append(
            {name: (loader if name.startswith("data only") else template) / rate for name, rate in medians.items()}
        )
    wall, cpu = out
    return [(name, wall[name], cpu[name]) for name in wall]


def main() -> None:
    figures = measure()
    print(f"data: {figures['source']}; {figures['images']} training images, batch 100, 784-256-256-10 ReLU, Adam")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'pipeline':46} {'samples/s':>10} {'min-max':>17} {'CPU samples/s':>14} {'template is (wall, CPU)':>24}")
    for name, wall, cpu in ratios(figures):
        values = figures["samples_per_s"][name]
        spread = f"{min(values):.0f}-{max(values):.0f}"
        median, cpu_median = statistics.median(values), statistics.median(figures["cpu_samples_per_s"][name])
        print(f"{name:46} {median:10.0f} {spread:>17} {cpu_median:14.0f} {wall:11.2f}x {cpu:10.2f}x")
    if figures["peak_rss_mib"] is not None:
        print(f"peak RSS of a 1-epoch Fashion-MNIST fit process: {figures['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
