"""The sides the benchmark suite times: the template's fit, a bare ``Trainer.fit`` (with and without
the template's logging), the plain PyTorch loop, a study run as its workers build it, the CLI's start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn

from src.callbacks import GradNormMonitor, LayerStatsMonitor
from src.cli import DEFAULT_CONFIG, TemplateCLI

REPO = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], float | None]) -> float:
    """Wall time of ``fn()``, or the time it measured itself when it returns one (its timed part)."""
    start = time.perf_counter()
    own = fn()
    return own if isinstance(own, float) else time.perf_counter() - start


def interleaved(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each side ``repeats`` times, in turns; every other turn in reverse order, so that what one fit
    leaves to the next (TensorBoard's writer still flushing, memory to reclaim) does not always fall
    on the same side."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides.items())
    for turn in range(repeats):
        for name, fn in order if turn % 2 == 0 else order[::-1]:
            times[name].append(timed(fn))
    return times


def template_fit(
    epochs: int,
    root: str,
    grad_every: int | None = 10,
    monitor: bool = True,
    without: str | None = None,
    progress_bar: bool = False,
    layers: str = "default",
) -> Callable[[], float]:
    """A fit of the default config as ``python -m src.train`` runs it (logger, checkpoints, callbacks).

    ``without`` takes one part away, to see what it costs: ``"callbacks"`` (all of them, checkpoints
    included), ``"logger"`` (TensorBoard) or ``"self.log"`` (the module's metric logging, and so the
    plateau checks that read the metrics). The config's progress bar is off unless ``progress_bar``
    (a benchmark's output is its table), so that row 1 measures the same work before and after it.
    ``layers``: ``default`` (the CLI's ``LayerStatsMonitor`` at its default rates), ``no histograms``
    or ``off`` (without it).
    """

    def run() -> float:
        args = ["--config", str(DEFAULT_CONFIG), f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={root}"]
        args.append(f"--trainer.enable_progress_bar={str(progress_bar).lower()}")
        cli = TemplateCLI(args=args, run=False)
        trainer, model = cli.trainer, cli.model
        for cb in trainer.callbacks:
            if isinstance(cb, GradNormMonitor) and grad_every is not None:
                cb.log_every_n_steps = grad_every
        if not monitor:
            trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, GradNormMonitor)]
        if layers == "off":
            trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, LayerStatsMonitor)]
        elif layers == "no histograms":
            for cb in trainer.callbacks:
                if isinstance(cb, LayerStatsMonitor):
                    cb.histogram_every_n_steps = 0
        if without == "callbacks":
            trainer.callbacks = []
        elif without == "logger":
            trainer.loggers = []
        elif without == "self.log":
            model.log = lambda *args, **kwargs: None
        start = time.perf_counter()  # the fit itself; parsing the config is row 4's business
        trainer.fit(model, datamodule=cli.datamodule)
        return time.perf_counter() - start

    return run


def toy_net(depth: int = 7) -> nn.Module:
    from src.models import MLPClassifier

    return MLPClassifier(in_features=2, num_classes=2, depth=depth, width=10, activation="sigmoid").net


def plain_loop(epochs: int, depth: int = 7) -> Callable[[], float]:
    """The source's loop: the same MLP, data and SGD, no framework; it keeps the loss curve."""
    from src.data import Toy2DDataModule

    def run() -> float:
        torch.manual_seed(0)
        dm = Toy2DDataModule()
        dm.setup("fit")
        x, y = dm.train_set.tensors
        y = y.float()
        net = toy_net(depth)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        loss_fn = nn.BCEWithLogitsLoss()
        losses = []
        start = time.perf_counter()
        for _ in range(epochs):
            loss = loss_fn(net(x).squeeze(-1), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())  # the curve that shows the stall at ln 2 (no host sync per step)
        return time.perf_counter() - start

    return run


class BareModule(L.LightningModule):
    """The same MLP, loss and SGD as a minimal LightningModule: no logging, no metrics."""

    def __init__(self, depth: int = 7) -> None:
        super().__init__()
        self.net = toy_net(depth)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.net(x).squeeze(-1), y.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LoggingBareModule(BareModule):
    """The bare module that logs what the template logs per epoch: train loss and accuracy."""

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x).squeeze(-1)
        loss = self.loss_fn(logits, y.float())
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True)
        self.log("train/acc", ((logits > 0) == y).float().mean(), on_step=False, on_epoch=True)
        return loss


def bare_fit(epochs: int, logging: bool = False, root: str | None = None, depth: int = 7) -> Callable[[], float]:
    """Lightning's own floor: ``Trainer.fit`` with no logger, callbacks, checkpoints or validation;
    with ``logging``, plus the template's two ``self.log`` calls per epoch and its TensorBoard logger
    (Lightning's floor for a module that logs its epoch metrics, as the template's does)."""
    from src.data import Toy2DDataModule
    from src.loggers import BatchedTensorBoardLogger

    def run() -> float:
        torch.manual_seed(0)
        model, dm = (LoggingBareModule if logging else BareModule)(depth), Toy2DDataModule()
        trainer = L.Trainer(
            max_epochs=epochs, logger=BatchedTensorBoardLogger(root) if logging else False,
            enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        return time.perf_counter() - start

    return run


def startup(repeats: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = {
        "python -m src.train --help": [sys.executable, "-m", "src.train", "--help"],
        "python -m src.train fit --help": [sys.executable, "-m", "src.train", "fit", "--help"],
        "import src.cli (torch + Lightning)": [sys.executable, "-c", "import src.cli"],
    }
    sides = {
        name: (lambda c=cmd: subprocess.run(c, env=env, cwd=REPO, capture_output=True, check=True))
        for name, cmd in commands.items()
    }
    return interleaved(sides, repeats)


STUDY_FILE = REPO / "configs" / "study" / "vanishing.yaml"
STUDY_POINT = {"policy": "none", "activation": "sigmoid", "depth": 18, "seed": 0}


def study_fit(epochs: int, root: str) -> Callable[[], float]:
    """A run of the vanishing study as its workers build it (``src.study.prepare_run``): the grid point
    ``STUDY_POINT``, which stalls, so that every epoch does the same work; ``epochs`` epochs."""
    from dataclasses import replace

    from src import study

    def run() -> float:
        spec = study.load_study(STUDY_FILE)
        spec = replace(spec, args=(*spec.args, f"--trainer.max_epochs={epochs}"))
        cli, _ = study.prepare_run(spec, STUDY_POINT, root)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return time.perf_counter() - start

    return run
