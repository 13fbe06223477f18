"""How often the default config's escape policy gets a stalled sigmoid net out, over seeds and nets.

    python benchmarks/escape_policy.py --seeds 10 --nets 7x10 6x10 8x10 7x8 7x16

For each net (depth x width) and seed it trains the default config twice, with and without the
PlateauEscape callback, and prints the final train loss, the first epoch below 0.05, and the
stall events with their diagnosis.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L

from src.callbacks import PlateauDetector, PlateauEscape
from src.cli import DEFAULT_CONFIG, TemplateCLI


class FirstEpochBelow(L.Callback):
    def __init__(self, threshold: float) -> None:
        self.threshold, self.epoch = threshold, None

    def on_train_epoch_end(self, trainer, pl_module):
        if self.epoch is None and trainer.callback_metrics["train/loss"].item() < self.threshold:
            self.epoch = trainer.current_epoch


def run(depth: int, width: int, seed: int, escape: bool, epochs: int) -> dict:
    cli = TemplateCLI(
        args=[
            "--config", str(DEFAULT_CONFIG),
            f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
            f"--model.depth={depth}", f"--model.width={width}", f"--trainer.max_epochs={epochs}",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
        ],
        run=False,
        save_config_callback=None,
    )  # fmt: skip
    trainer = cli.trainer
    if not escape:
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, PlateauEscape)]
    probe = FirstEpochBelow(0.05)
    trainer.callbacks.append(probe)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    detector = next(cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector))
    return {
        "final": trainer.callback_metrics["train/loss"].item(),
        "below_0.05_at": probe.epoch,
        "events": [(e["epoch"], e.get("diagnosis"), [a["action"] for a in e["actions"]]) for e in detector.events],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--nets", nargs="+", default=["7x10"], help="depth x width, e.g. 7x10 6x10 8x16")
    parser.add_argument("--no-baseline", action="store_true", help="skip the runs without the escape")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for net in args.nets:
        depth, width = (int(v) for v in net.split("x"))
        for escape in (False, True)[args.no_baseline :]:
            results = [run(depth, width, seed, escape, args.epochs) for seed in range(args.seeds)]
            for seed, r in enumerate(results):
                print(f"  {net} escape={escape} seed={seed}: final {r['final']:.4f}, "
                      f"<0.05 at {r['below_0.05_at']}, events {r['events']}", flush=True)  # fmt: skip
            solved = sum(r["final"] < 0.05 for r in results)
            print(f"{net} {'with' if escape else 'without'} escape: train loss < 0.05 in {solved}/{len(results)} seeds")


if __name__ == "__main__":
    main()
