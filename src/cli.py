"""The template's LightningCLI, run by ``python -m src.train [fit|validate|test|predict] [--config FILE] [options]``.

With no subcommand it runs ``fit``; with no ``--config`` it uses ``configs/default.yaml``. A bad
option, value or file ends in one ``error:`` line (set ``TEMPLATE_DEBUG=1`` for the traceback).
Everything here uses LightningCLI's public hooks; checkpoint resolution lives in
:mod:`src.checkpoints`, the end-of-fit summary in :mod:`src.summary`, error lines in :mod:`src.errors`.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class

from src.callbacks import FiniteModelCheckpoint, GracefulStop, LayerStatsMonitor, TensorBoardDashboard
from src.callbacks.plateau_rule import StallReporter
from src.checkpoints import resolve_ckpt_path
from src.errors import debugging, one_line, one_line_errors
from src.loggers import BatchedTensorBoardLogger
from src.models import MLPClassifier
from src.names import DEBUG_ENV
from src.summary import run_summary

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config value in one line on stderr and exits with status 2."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if debugging():
            return super().error(message, ex)
        sys.stderr.write(f"error: {one_line(message)} (options: python -m src.train fit --help)\n")
        sys.exit(2)


class TemplateCLI(LightningCLI):
    """LightningCLI with the template's wiring.

    - The data's shapes flow into the model (``data.in_features`` -> ``model.in_features``...).
    - A checkpoint callback is always present (the ``checkpoint:`` section, Lightning's
      ``ModelCheckpoint`` that never saves a diverged model); ``trainer.enable_checkpointing: false``
      leaves it out.
    - Every run stops cleanly on SIGTERM/SIGINT (``GracefulStop``) and gets the TensorBoard
      dashboards and every layer's statistics (``LayerStatsMonitor``), unless the config already has them.
    - The default logger is TensorBoard without Lightning's placeholder ``hp_metric``; ``--ckpt_path``
      may be ``last`` (the newest run), and a resumed run goes on logging into its own directory.
    - A bad optimizer or scheduler value is reported before anything is built, naming the section.
    - A short summary ends each fit, and ``exit_status`` says how it ended: 0, 1 after a divergence,
      128 + the signal's number after a stop by SIGTERM/SIGINT. :func:`main` exits with it; a hook
      never ends the process, so ``TemplateCLI(...)`` in a notebook returns.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", MLPClassifier)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", OneLineErrorParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        self.resume_version: int | None = None
        self.exit_status = 0
        super().__init__(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.in_features", "model.in_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # Not add_lightning_class_args: a callback added that way is always passed to the Trainer,
        # which then fails on `enable_checkpointing: false`. instantiate_trainer adds it instead.
        parser.add_class_arguments(FiniteModelCheckpoint, "checkpoint", fail_untyped=False, sub_configs=True)
        parser.set_defaults({"checkpoint.save_last": True})

    def section(self, config: Any) -> Any:
        """The subcommand's part of a config (the whole config when run without a subcommand)."""
        return config[self.subcommand] if self.subcommand else config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads the checkpoint's hyperparameters: resolve `last`, check the file.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("ckpt_path"):
            root = config.trainer.get("default_root_dir") or os.getcwd()
            config.ckpt_path, self.resume_version = resolve_ckpt_path(config.ckpt_path, root)

    def before_instantiate_classes(self) -> None:
        config = self.section(self.config)
        check_trainer_config(config.trainer)
        check_optimizer_config(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.section(self.config_init)
        trainer = config["trainer"]
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is False:  # the flag turns off whichever bar the config names
            callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
        if trainer.get("enable_checkpointing") is not False:
            callbacks.append(config["checkpoint"])
        callbacks += [
            kind() for kind in (GracefulStop, TensorBoardDashboard, LayerStatsMonitor) if not _has(callbacks, kind)
        ]
        kwargs.setdefault("callbacks", callbacks)
        if trainer.get("logger") in (None, True):
            kwargs.setdefault(
                "logger",
                BatchedTensorBoardLogger(
                    save_dir=trainer.get("default_root_dir") or os.getcwd(),
                    version=self.resume_version,  # None: the next free version_N
                    default_hp_metric=False,  # the dashboard writes the real final metrics
                ),
            )
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        summary = run_summary(self.trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if self.trainer.is_global_zero:
            print(summary, flush=True)
        stop = next((cb for cb in self.trainer.callbacks if isinstance(cb, GracefulStop)), None)
        if stop is not None and stop.stopped_by is not None:
            if self.trainer.is_global_zero:
                print(f"Stopped by {stop.stopped_by}. Resume: python -m src.train fit [same options] --ckpt_path last")
            signum = getattr(signal, stop.stopped_by, None)
            self.exit_status = 128 + int(signum) if signum is not None else 1
        elif any(cb.diverged for cb in self.trainer.callbacks if isinstance(cb, StallReporter)):
            self.exit_status = 1


def _has(callbacks: list[Any], kind: type) -> bool:
    return any(isinstance(cb, kind) for cb in callbacks)


def check_trainer_config(trainer: Any) -> None:
    """Reject Trainer values that Lightning would accept and then misbehave on (or crash deep inside)."""
    value = trainer.get("check_val_every_n_epoch")
    if value is not None and value < 1:
        raise ValueError(f"trainer.check_val_every_n_epoch={value}: must be >= 1")
    devices, accelerator = trainer.get("devices"), trainer.get("accelerator")
    count = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
    on_cpu = accelerator == "cpu" or (accelerator in ("auto", None) and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if count is not None and on_cpu and count > cores:
        raise ValueError(
            f"trainer.devices={devices}: that many CPU processes on a machine with {cores} cores; "
            f"use at most {cores} (each DDP process is one device)"
        )


def check_optimizer_config(config: Any) -> None:
    """Build the configured optimizer (and scheduler) once on a dummy parameter, so that a bad value
    such as a negative lr is reported now, naming the section, not midway into fit."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for key in ("optimizer", "lr_scheduler"):
        if config.get(key) is None:
            continue
        try:
            built = instantiate_class((params,) if key == "optimizer" else optimizer, config[key])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{key} ({config[key].class_path}): {one_line(err)}") from err
        if key == "optimizer":
            optimizer = built


def check_config_files(argv: list[str]) -> None:
    """Name the config file that is not valid YAML (jsonargparse reports the error without the file)."""
    for index, arg in enumerate(argv):
        path = argv[index + 1] if arg in ("-c", "--config") and index + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path is None or "\n" in path or not Path(path).is_file():  # a config given inline, as YAML text
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or err
            raise ValueError(f"config file {path}{where}: not valid YAML ({problem})") from None


def resolve_argv(argv: list[str]) -> list[str]:
    """Add ``fit`` when no subcommand is given and the default config when no config is given.

    Idempotent: Lightning's DDP launcher starts each extra process with the same argv, which then
    already holds both.

    >>> resolve_argv(["--model.depth", "3"])[:2]
    ['fit', '--config']
    >>> resolve_argv(["test", "--config", "my.yaml"])
    ['test', '--config', 'my.yaml']
    """
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["fit", *argv]
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


def quiet_expected_warnings() -> None:
    # Both are by design here: the CLI supplies the optimizer, and a full-batch epoch is one step
    # while metrics are logged per epoch anyway.
    warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by")
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    # Lightning 2.6 calls a torch pytree API that newer torch deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the command line) and return the exit status (see
    :class:`TemplateCLI`); exit non-zero with one line on bad input."""
    quiet_expected_warnings()
    # Rewriting sys.argv (not passing args=) keeps what DDP's launcher re-runs equal to what ran here.
    sys.argv[1:] = resolve_argv(sys.argv[1:] if argv is None else argv)
    # Under DDP every process fails the same way: one line per machine is enough.
    quiet = os.environ.get("LOCAL_RANK", "0") != "0"
    try:
        with one_line_errors(hint=f" (set {DEBUG_ENV}=1 for the traceback)", show_type=True, quiet=quiet):
            check_config_files(sys.argv[1:])
            return TemplateCLI().exit_status
    finally:
        # Lightning leaves the process group up. Left to interpreter shutdown, a rank once aborted there
        # under torchrun ("terminate called without an active exception"), failing its node's agent.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
