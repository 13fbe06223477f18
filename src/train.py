"""Command line entry point: ``python -m src.train [fit|validate|test|predict] [--config FILE] [options]``.

With no subcommand it runs ``fit``; with no ``--config`` it uses ``configs/default.yaml``.
Set ``TEMPLATE_DEBUG=1`` to see the full traceback of an error instead of its one-line summary.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class

from src.callbacks import PlateauDetector
from src.callbacks.plateau import describe_event
from src.models import MLPClassifier

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "TEMPLATE_DEBUG"


def one_line(message: object) -> str:
    return " ".join(str(message).split())


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
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # `trainer.enable_checkpointing: false` turns the always-present checkpoint callback off
        # instead of failing on it.
        if config.get("enable_checkpointing") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        # Build the configured optimizer (and scheduler) once on a dummy parameter, so that a bad
        # value such as a negative lr is reported now, naming the section, not midway into fit.
        config = self.config[self.subcommand] if self.subcommand else self.config
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
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
        lines.append(f"  last  {trainer.checkpoint_callback.last_model_path}")
    root = trainer.logger.root_dir if trainer.logger is not None else "lightning_logs"
    lines.append(f"  view  tensorboard --logdir {root}")
    return "\n".join(lines)


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
        TemplateCLI()
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        sys.stderr.write(f"error: {type(err).__name__}: {one_line(err)} (set {DEBUG_ENV}=1 for the traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
