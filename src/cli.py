"""The template's LightningCLI, run by ``python -m src.train [fit|validate|test|predict] [--config FILE] [options]``.

With no subcommand it runs ``fit``; with no ``--config`` it uses ``configs/default.yaml``.
Set ``TEMPLATE_DEBUG=1`` to see the full traceback of an error instead of its one-line summary.
``src/train.py`` is the light entry point; everything here is also importable from ``src.train``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import TensorBoardLogger

from src.callbacks import FiniteModelCheckpoint, GracefulStop, PlateauDetector, TensorBoardDashboard
from src.callbacks.plateau import describe_event
from src.models import MLPClassifier

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "TEMPLATE_DEBUG"


def one_line(message: object) -> str:
    """The message on one line; jsonargparse's 'none of the Union subtypes' lists cut to what matters."""
    text = " ".join(str(message).split())
    match = re.search(r"Does not validate against any of the Union subtypes Subtypes: \[.*?\] Errors: (.*)$", text)
    if match is None:
        return text
    errors = [e.strip() for e in re.split(r"(?:^| )- ", match.group(1)) if e.strip()]
    useful = [
        re.sub(r" ?Given value type: <class '[^']*'>", "", e)
        for e in errors
        if not e.startswith(("Expected a <class 'NoneType'>", "Expected a <class 'list'>", "Expected a <class 'bool'>"))
    ]
    return text[: match.start()] + " | ".join(useful or errors)


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config value in one line on stderr and exits with status 2."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if os.environ.get(DEBUG_ENV):
            return super().error(message, ex)
        sys.stderr.write(f"error: {one_line(message)} (options: python -m src.train fit --help)\n")
        sys.exit(2)


class TemplateCLI(LightningCLI):
    """LightningCLI with the template's wiring: data shapes flow into the model, a checkpoint
    callback is always present (``checkpoint:`` section), and a short summary ends each fit."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("model_class", MLPClassifier)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", OneLineErrorParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.in_features", "model.in_features", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(FiniteModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # `trainer.enable_checkpointing: false` turns the always-present checkpoint callback off
        # instead of failing on it.
        if config.get("enable_checkpointing") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        # Every CLI run stops cleanly on SIGTERM/SIGINT and gets the TensorBoard dashboards.
        for kind in (GracefulStop, TensorBoardDashboard):
            if not any(isinstance(cb, kind) for cb in [*callbacks, *(config.get("callbacks") or [])]):
                callbacks = [*callbacks, kind()]
        trainer = super()._instantiate_trainer(config, callbacks)
        version = getattr(self, "resume_version", None)
        if version is not None and isinstance(trainer.logger, TensorBoardLogger) and trainer.logger._version is None:
            trainer.logger._version = version  # a resumed run goes on writing into its own run directory
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here: resolve `last` and check the file first.
        self._resolve_ckpt_path()
        if hasattr(super(), "_parse_ckpt_path"):
            super()._parse_ckpt_path()

    def _resolve_ckpt_path(self) -> None:
        if getattr(self, "resume_version", False) is not False:
            return  # done already
        self.resume_version = None
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("ckpt_path"):
            config.ckpt_path, self.resume_version = resolve_ckpt_path(
                config.ckpt_path, config.trainer.get("default_root_dir") or os.getcwd()
            )

    def before_instantiate_classes(self) -> None:
        self._resolve_ckpt_path()
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_trainer_config(config.trainer)
        # Build the configured optimizer (and scheduler) once on a dummy parameter, so that a bad
        # value such as a negative lr is reported now, naming the section, not midway into fit.
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

    def after_fit(self) -> None:
        summary = run_summary(self.trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if self.trainer.is_global_zero:
            print(summary, flush=True)
        stop = next((cb for cb in self.trainer.callbacks if isinstance(cb, GracefulStop)), None)
        if stop is not None and stop.stopped_by is not None:
            if self.trainer.is_global_zero:
                print(f"Stopped by {stop.stopped_by}. Resume: python -m src.train fit [same options] --ckpt_path last")
            signum = getattr(signal, stop.stopped_by, None)
            sys.exit(128 + int(signum) if signum is not None else 1)
        if any(isinstance(cb, PlateauDetector) and cb.diverged for cb in self.trainer.callbacks):
            sys.exit(1)


def check_trainer_config(trainer: Any) -> None:
    """Reject Trainer values that Lightning would accept and then misbehave on (or crash deep inside)."""
    for key, low in (("max_epochs", -1), ("max_steps", -1), ("check_val_every_n_epoch", 1), ("num_nodes", 1)):
        value = trainer.get(key)
        if value is not None and value < low:
            raise ValueError(f"trainer.{key}={value}: must be >= {low}" + (" (-1: no limit)" if low == -1 else ""))
    devices, accelerator = trainer.get("devices"), trainer.get("accelerator")
    count = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
    on_cpu = accelerator == "cpu" or (accelerator in ("auto", None) and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if count is not None and on_cpu and count > cores:
        raise ValueError(
            f"trainer.devices={devices}: that many CPU processes on a machine with {cores} cores; "
            f"use at most {cores} (each DDP process is one device)"
        )


def newest_last_checkpoint(root: Path) -> Path | None:
    """The ``last.ckpt`` written most recently under ``root/lightning_logs/*/checkpoints/``."""
    candidates = [p for p in Path(root).glob("lightning_logs/*/checkpoints/last.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_ckpt_path(ckpt_path: str, root: str | Path) -> tuple[str, int | None]:
    """``last`` -> the newest run's ``last.ckpt``; check that a given path is a checkpoint file.

    Returns the path and, when it lies in ``lightning_logs/version_N/checkpoints``, N (the run the
    resumed fit goes on logging into).
    """
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
        return ckpt_path, None  # Lightning's own meanings
    if ckpt_path == "last":
        found = newest_last_checkpoint(Path(root))
        if found is None:
            raise FileNotFoundError(
                f"ckpt_path=last: no lightning_logs/*/checkpoints/last.ckpt under {root}; "
                "run fit first, or give the checkpoint's path"
            )
        path = found
    else:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file; give a .ckpt file or 'last'")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"ckpt_path={ckpt_path}: not a checkpoint (torch.save writes a zip archive)")
    run = path.parent.parent.name
    version = int(run.removeprefix("version_")) if run.startswith("version_") and run[8:].isdigit() else None
    return str(path), version


def run_summary(trainer: Trainer) -> str:
    """The lines printed when a fit ends: final metrics, where the run is, how to look at it."""
    metrics = trainer.callback_metrics
    lines = [f"Finished after {trainer.current_epoch} epochs ({trainer.global_step} steps)."]
    for stage in ("train", "val"):
        values = [
            f"{name} {metrics[f'{stage}/{name}'].item():.4f}"
            for name in ("loss", "acc", "prob_mae")
            if f"{stage}/{name}" in metrics
        ]
        if values:
            lines.append(f"  {stage:<5} " + ", ".join(values))
    for detector in (cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector)):
        lines.append(f"  {len(detector.events)} stall/divergence event(s) on {detector.monitor}")
        lines.extend(f"    {describe_event(event)}" for event in detector.events[:10])
        if len(detector.events) > 10:
            lines.append(f"    ... {len(detector.events) - 10} more in stall_events.json")
    if trainer.log_dir:
        lines.append(f"  logs  {trainer.log_dir}")
    checkpoint = trainer.checkpoint_callback
    last = Path(checkpoint.last_model_path) if checkpoint is not None and checkpoint.last_model_path else None
    skipped = getattr(checkpoint, "skipped", 0)
    if last is not None and last.is_file():
        saved = getattr(checkpoint, "saved_epoch", None)
        note = f" (from epoch {saved}, before the divergence)" if skipped and saved is not None else ""
        lines.append(f"  last  {last}{note}")
    elif skipped:
        lines.append("  last  none: the run diverged before the first checkpoint was due")
    for detector in (cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector)):
        divergence = next((e for e in detector.events if e["kind"] == "divergence"), None)
        if divergence is not None:
            lines.append(
                f"  DIVERGED at epoch {divergence['epoch']}: {detector.monitor} = {divergence['value']}; "
                "lower the learning rate (the checkpoints are from before it)"
            )
    root = trainer.logger.root_dir if trainer.logger is not None else "lightning_logs"
    lines.append(f"  view  tensorboard --logdir {root}")
    return "\n".join(lines)


def check_config_files(argv: list[str]) -> None:
    """Name the config file that is not valid YAML (jsonargparse reports the error without the file)."""
    for index, arg in enumerate(argv):
        path = argv[index + 1] if arg in ("-c", "--config") and index + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path is None or not Path(path).is_file():
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


def main() -> None:
    quiet_expected_warnings()
    # Rewriting sys.argv (not passing args=) keeps what DDP's launcher re-runs equal to what ran here.
    sys.argv[1:] = resolve_argv(sys.argv[1:])
    try:
        check_config_files(sys.argv[1:])
        TemplateCLI()
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        # Under DDP every process fails the same way: one line per machine is enough.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            sys.stderr.write(f"error: {type(err).__name__}: {one_line(err)} (set {DEBUG_ENV}=1 for the traceback)\n")
        sys.exit(1)
    finally:
        # Lightning leaves the process group up. Left to interpreter shutdown, a rank once aborted there
        # under torchrun ("terminate called without an active exception"), failing its node's agent.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
