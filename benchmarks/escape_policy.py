"""How often a config's escape policy gets stalled nets out, over seeds, nets and activations.

    python -m benchmarks.escape_policy --seeds 10 --nets 7x10 6x10 8x10 7x8 7x16
    python -m benchmarks.escape_policy --nets 18x10 12x10 --activations sigmoid tanh relu --seeds 5
    python -m benchmarks.escape_policy --config configs/dnnex.yaml --nets 2x2 --activations relu \
        --metric val/prob_mae --below 0.03 --seeds 10

For each net (depth x width), activation and seed it trains the config twice, with and without the
PlateauEscape callback (model and data seed equal), and prints the final value of ``--metric``, the
first epoch below ``--below``, and the stall events with their diagnosis and actions.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

from src.callbacks import PlateauDetector, PlateauEscape
from src.cli import DEFAULT_CONFIG, TemplateCLI
from src.study import FirstEpochBelow


def run(config: str, depth: int, width: int, activation: str, seed: int, escape: bool, epochs: int | None,
        metric: str, below: float) -> dict:  # fmt: skip
    import torch

    from src.cli import quiet_expected_warnings

    torch.set_num_threads(1)  # the workers share the cores
    warnings.filterwarnings("ignore")
    quiet_expected_warnings()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args = [
        "--config", config, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
        f"--model.depth={depth}", f"--model.width={width}", f"--model.activation={activation}",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    if metric.startswith("train/"):
        args.append("--trainer.limit_val_batches=0")
    cli = TemplateCLI(args=args, run=False, save_config_callback=None)
    trainer = cli.trainer
    if not escape:
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, PlateauEscape)]
    probe = FirstEpochBelow(metric, below)
    trainer.callbacks.append(probe)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    detector = next((cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector)), None)
    events = detector.events if detector else []
    return {
        "final": trainer.callback_metrics[metric].item(),
        "below_at": probe.epoch,
        "events": [(e.epoch, e.diagnosis, [a.action for a in e.actions]) for e in events],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--seeds", type=int, nargs="+", default=[10], help="a count (0..N-1) or a list of seeds")
    parser.add_argument("--epochs", type=int, help="default: the config's max_epochs")
    parser.add_argument("--nets", nargs="+", default=["7x10"], help="depth x width, e.g. 7x10 6x10 8x16")
    parser.add_argument("--activations", nargs="+", default=["sigmoid"])
    parser.add_argument("--metric", default="train/loss")
    parser.add_argument("--below", type=float, default=0.05, help="a run succeeds when --metric ends below this")
    parser.add_argument("--no-baseline", action="store_true", help="skip the runs without the escape")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    seeds = list(range(args.seeds[0])) if len(args.seeds) == 1 else args.seeds
    cells = [
        (net, activation, escape)
        for net in args.nets for activation in args.activations for escape in (False, True)[args.no_baseline :]
    ]  # fmt: skip
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            (net, activation, escape, seed): pool.submit(
                run, args.config, *(int(v) for v in net.split("x")), activation, seed, escape, args.epochs,
                args.metric, args.below,
            )
            for net, activation, escape in cells for seed in seeds
        }  # fmt: skip
        for net, activation, escape in cells:
            results = [futures[(net, activation, escape, seed)].result() for seed in seeds]
            for seed, r in zip(seeds, results, strict=True):
                print(f"  {net} {activation} escape={escape} seed={seed}: final {r['final']:.4f}, "
                      f"<{args.below} at {r['below_at']}, events {r['events']}", flush=True)  # fmt: skip
            solved = sum(r["final"] < args.below for r in results)
            print(f"{net} {activation} {'with' if escape else 'without'} escape: {args.metric} < {args.below} "
                  f"in {solved}/{len(results)} seeds ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
