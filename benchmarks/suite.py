"""The template against the hand-written PyTorch loop, side by side in one process.

    python -m benchmarks.suite [--repeats 5] [--json benchmarks/results.json] [--quick] [--rows 1 2 3 4 7]

Rows (each side timed in the same process, interleaved, ``--repeats`` times; median and min-max):

1. toy 2-D, 1000 full-batch epochs of the depth-7 width-10 sigmoid MLP: ``Trainer.fit`` with the
   default config (its callbacks, logger and checkpoints) vs a plain loop with the same model,
   data and optimizer, and vs a bare ``Trainer.fit`` of the same (no logging, callbacks, logger,
   checkpoints or validation: what Lightning's loop itself costs); and the template without its
   callbacks, without its logger, without its ``self.log`` calls: what each part costs;
2. ``GradNormMonitor`` overhead: the same fit with the monitor logging every 10 steps (the
   default config) and every step, vs without it; and the CPU time of its two parts per logged
   step (the norms, the logger's write), steadier than a few percent of a fit on a shared VM;
   2b. the progress bar; 2c. ``LayerStatsMonitor`` at its default rates, without histograms, and without it;
3. one MNIST-sized epoch: the template vs a bare ``Trainer.fit`` vs a plain loop over in-memory
   tensors vs torchvision's Dataset + DataLoader + ToTensor, samples/s in wall and in CPU time
   (see ``benchmarks/mnist_pipeline.py``);
4. start-up: ``python -m src.train --help`` (the usage, without loading Lightning),
   ``python -m src.train fit --help`` (every option: loads the CLI) and ``import src.cli``;
5. peak RSS of a 1-epoch Fashion-MNIST fit process;
6. with CUDA: row 3's epoch on the GPU (template, bare ``Trainer.fit``, plain loop, the template's
   data path, and the template in ``configs/trainer/gpu.yaml``'s bf16-mixed);
7. a study run's epoch: a run of ``configs/study/vanishing.yaml`` built as its workers build it (a
   depth-18 sigmoid net that stalls, on one thread) vs a bare ``Trainer.fit`` of the same net, with
   and without the same logging, and the plain loop, in ms per epoch; and the CPU time per step of
   ``PlateauEscape``'s layer-wise steps on that net.

``--rows`` measures only those rows (2 includes 2b; 3 includes 5 and, with CUDA, 6).
``--quick`` shrinks everything (a smoke test: the figures then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import mnist_pipeline
from benchmarks.sides import (
    STUDY_POINT,
    bare_fit,
    interleaved,
    plain_loop,
    startup,
    study_fit,
    template_fit,
    toy_net,
)
from src.cli import quiet_expected_warnings


def fmt(values: list[float], unit: str = "s") -> tuple[str, str]:
    median = statistics.median(values)
    return f"{median:.3f} {unit}", f"{min(values):.3f}-{max(values):.3f}"


def toy_rows(args: argparse.Namespace, root: str, results: dict, table: list) -> None:
    """Row 1: the toy fit, its parts, Lightning's floors and the plain loop."""
    bare_fit(5)()
    bare_fit(5, logging=True, root=root)()
    plain_loop(5)()
    parts = ("callbacks", "logger", "self.log")
    sides = {
        "template": template_fit(args.epochs, root),
        **{f"without {part}": template_fit(args.epochs, root, without=part) for part in parts},
        "bare": bare_fit(args.epochs),
        "bare + logging": bare_fit(args.epochs, logging=True, root=root),
        "plain": plain_loop(args.epochs),
    }
    row1 = interleaved(sides, args.repeats)
    results["1 toy fit"] = row1
    plain = statistics.median(row1["plain"])
    template = statistics.median(row1["template"])
    name = f"1. toy, {args.epochs} epochs: Trainer.fit, default config"
    bare = statistics.median(row1["bare"])
    floor = statistics.median(row1["bare + logging"])
    note = f"{template / plain:.2f}x plain, {template / bare:.2f}x bare, {template / floor:.2f}x bare + logging"
    table.append((name, *fmt(row1["template"]), note))
    for part in parts:
        median = statistics.median(row1[f"without {part}"])
        note = f"{median / plain:.2f}x plain: the {part} cost {100 * (1 - median / template):.0f}% of the fit"
        table.append((f"   the same without {part}", *fmt(row1[f"without {part}"]), note))
    note = f"{statistics.median(row1['bare']) / plain:.2f}x plain: Lightning's floor"
    table.append(("   bare Trainer.fit: no logging, callbacks, logger", *fmt(row1["bare"]), note))
    note = f"{floor / plain:.2f}x plain, {floor / bare:.2f}x bare: Lightning's floor with 2 self.log per epoch"
    table.append(("   bare + the same 2 self.log per epoch + TensorBoard", *fmt(row1["bare + logging"]), note))
    table.append((f"   plain PyTorch loop, {args.epochs} epochs", *fmt(row1["plain"]), ""))


def overhead(sides: dict[str, list[float]], name: str, baseline: str, repeats: int) -> str:
    # A shared VM's noise is one-sided (runs get slower, never faster): the best of N repeats is
    # the steadier estimate of an overhead of a few percent; the median is shown as well.
    best = 100 * (min(sides[name]) / min(sides[baseline]) - 1)
    median = 100 * (statistics.median(sides[name]) / statistics.median(sides[baseline]) - 1)
    return f"{best:+.1f}% vs without (best of {repeats}; medians {median:+.1f}%)"


def monitor_parts(root: str, calls: int, repeats: int) -> tuple[dict[str, list[float]], int]:
    """CPU µs per logged step of what ``GradNormMonitor`` does, on the default net's gradients: the
    norms (``GradNormRecorder.record``) and the logger's write of the step's scalars as one event
    (TensorBoard's writer thread checksums it, so the process's CPU time over the calls and a flush);
    and how many scalars that event holds."""
    from src.callbacks.grad_flow import GradNormRecorder
    from src.callbacks.names import GRAD_NORM, GRAD_NORM_LOG10
    from src.loggers import BatchedTensorBoardLogger

    net = toy_net()
    net(torch.randn(20, 2)).sum().backward()
    recorder = GradNormRecorder().bind(net)
    profile = recorder.record(0)
    norms = list(zip(profile.names, profile.norms, strict=True))
    metrics = {f"{GRAD_NORM}{name}": value for name, value in norms}  # what the monitor logs by default
    metrics.update((f"{GRAD_NORM_LOG10}{name}", math.log10(value)) for name, value in norms)
    metrics.update(total=profile.total, first_to_last=profile.first_to_last())
    logger = BatchedTensorBoardLogger(root, name="parts")

    def per_call(fn: Callable[[], object], finish: Callable[[], object] = lambda: None) -> float:
        start = time.process_time()
        for _ in range(calls):
            fn()
        finish()
        return (time.process_time() - start) / calls * 1e6

    parts = {
        "record": lambda: per_call(lambda: recorder.record(0)),
        "log": lambda: per_call(lambda: logger.log_metrics(metrics, step=0), logger.experiment.flush),
    }
    return interleaved(parts, repeats), len(metrics)


def monitor_rows(args: argparse.Namespace, root: str, results: dict, table: list) -> None:
    """Rows 2 and 2b: what GradNormMonitor and the progress bar add to the toy fit."""
    row2 = interleaved(
        {
            "without": template_fit(args.epochs, root, monitor=False),
            "every 10": template_fit(args.epochs, root, grad_every=10),
            "every step": template_fit(args.epochs, root, grad_every=1),
        },
        args.repeats,
    )
    results["2 grad norm overhead"] = row2
    for name in ("every 10", "every step"):
        table.append((f"2. GradNormMonitor {name}", *fmt(row2[name]), overhead(row2, name, "without", args.repeats)))
    table.append(("   without GradNormMonitor", *fmt(row2["without"]), ""))
    parts, scalars = monitor_parts(root, calls=50 if args.quick else 2000, repeats=args.repeats)
    results["2 grad norm parts, CPU us per logged step"] = parts
    step = 1e6 * statistics.median(row2["without"]) / args.epochs  # one full-batch step per epoch
    for key, name in (
        ("record", "the norms: GradNormRecorder.record"),
        ("log", f"the logger: {scalars} scalars as one event, checksum included"),
    ):
        note = f"{statistics.median(parts[key]) / step:.1%} of a step without the monitor ({step:.0f} µs)"
        table.append((f"   per logged step, {name}", *fmt(parts[key], "µs"), note))
    row2b = interleaved(
        {"without": template_fit(args.epochs, root), "with": template_fit(args.epochs, root, progress_bar=True)},
        args.repeats,
    )
    results["2b progress bar overhead"] = row2b
    note = overhead(row2b, "with", "without", args.repeats)
    table.append(("2b. EpochProgressBar (the configs' bar)", *fmt(row2b["with"]), note))
    row2c = interleaved(
        {
            "without": template_fit(args.epochs, root, layers="off"),
            "no histograms": template_fit(args.epochs, root, layers="no histograms"),
            "default": template_fit(args.epochs, root),
        },
        args.repeats,
    )
    results["2c layer statistics overhead"] = row2c
    table.append(("2c. LayerStatsMonitor, default rates", *fmt(row2c["default"]),
                  overhead(row2c, "default", "without", args.repeats)))  # fmt: skip
    table.append(("   the same without histograms", *fmt(row2c["no histograms"]),
                  overhead(row2c, "no histograms", "without", args.repeats)))  # fmt: skip
    table.append(("   without LayerStatsMonitor", *fmt(row2c["without"]), ""))
    table.append(("   its histograms alone (default vs without them)", "", "",
                  overhead(row2c, "default", "no histograms", args.repeats)))  # fmt: skip


def trust_ratio_cost(depth: int, calls: int, repeats: int) -> list[float]:
    """CPU µs per step of ``PlateauEscape``'s layer-wise steps (``trust_ratio_``) on a depth-``depth``
    net's gradients."""
    from src.callbacks.escape_actions import trust_ratio_
    from src.callbacks.grad_flow import parameter_layers

    net = toy_net(depth)
    net(torch.randn(20, 2)).sum().backward()
    layers, optimizer = parameter_layers(net), torch.optim.SGD(net.parameters(), lr=0.1)

    def per_call() -> float:
        start = time.process_time()
        for _ in range(calls):
            trust_ratio_(layers, optimizer, 1.0)  # ratio 1: the gradients keep their size from call to call
        return (time.process_time() - start) / calls * 1e6

    return interleaved({"trust_ratio_": per_call}, repeats)["trust_ratio_"]


def study_rows(args: argparse.Namespace, root: str, results: dict, table: list) -> None:
    """Row 7: the per-epoch cost of a study run against Lightning's floors and the plain loop, on one
    thread (the study's workers run on one thread each), and the cost of the layer-wise steps."""
    depth, threads = STUDY_POINT["depth"], torch.get_num_threads()
    try:
        study_fit(5, root)()  # warm-up; it also sets one thread, as in a worker
        torch.set_num_threads(1)
        sides = {
            "study run": study_fit(args.epochs, root),
            "bare": bare_fit(args.epochs, depth=depth),
            "bare + logging": bare_fit(args.epochs, logging=True, root=root, depth=depth),
            "plain": plain_loop(args.epochs, depth=depth),
        }
        row7 = interleaved(sides, args.repeats)
        results["7 study run"] = row7
        steps = trust_ratio_cost(depth, calls=50 if args.quick else 1000, repeats=args.repeats)
        results["7 trust_ratio_ CPU us per step"] = {"trust_ratio_": steps}
    finally:
        torch.set_num_threads(threads)
    ms = {name: 1000 * statistics.median(values) / args.epochs for name, values in row7.items()}
    point = ", ".join(f"{key} {value}" for key, value in STUDY_POINT.items())
    names = {
        "study run": f"7. a study run's epoch (vanishing.yaml: {point})",
        "bare": f"   bare Trainer.fit, the same depth-{depth} net",
        "bare + logging": "   bare + the same 2 self.log per epoch + TensorBoard",
        "plain": "   plain PyTorch loop",
    }
    for name, label in names.items():
        values = [1000 * v / args.epochs for v in row7[name]]
        note = "" if name == "plain" else f"{ms[name] / ms['plain']:.2f}x plain"
        if name == "study run":
            note += f", {ms[name] / ms['bare']:.2f}x bare, {ms[name] / ms['bare + logging']:.2f}x bare + logging"
        table.append((label, *fmt(values, "ms"), note))
    note = f"{statistics.median(steps) / (1000 * ms['study run']):.1%} of the study run's epoch"
    label = f"7. PlateauEscape's layer-wise steps (trust_ratio_), depth {depth}, per step"
    table.append((label, *fmt(steps, "µs"), note))


def mnist_rows(args: argparse.Namespace, results: dict, table: list) -> str:
    """Rows 3 and 5 on the CPU, and row 6 (the same epoch on the GPU, float32 and bf16-mixed) with CUDA."""
    argv = ["--repeats", str(args.repeats)] + (["--no-rss", "--limit", "2000"] if args.quick else [])
    runs = [("3", "cpu", argv)]
    if torch.cuda.is_available():
        runs.append(("6", "gpu", [*argv, "--no-rss", "--no-torchvision"]))
    source = ""
    for row, accelerator, run_argv in runs:
        mnist = mnist_pipeline.measure([*run_argv, "--accelerator", accelerator])
        source = mnist["source"]
        results[f"{row} mnist epoch samples/s"] = mnist["samples_per_s"]
        results[f"{row} mnist epoch samples/s of CPU time"] = mnist["cpu_samples_per_s"]
        for name, wall, cpu in mnist_pipeline.ratios(mnist):
            values = mnist["samples_per_s"][name]
            median = f"{statistics.median(values):.0f} samples/s"
            who = "template loader" if name.startswith("data only") else "template"
            note = "" if wall == 1 else f"{who} is {wall:.2f}x (in CPU time {cpu:.2f}x)"
            table.append((f"{row}. {name}", median, f"{min(values):.0f}-{max(values):.0f}", note))
        if mnist["peak_rss_mib"] is not None:
            table.append(("5. peak RSS, Fashion-MNIST fit process", f"{mnist['peak_rss_mib']:.0f} MiB", "", ""))
    if len(runs) == 1:
        table.append(("6. GPU rows", "skipped", "", "no CUDA device on this machine"))
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: checks that the suite runs")
    parser.add_argument(
        "--rows", type=int, nargs="+", choices=(1, 2, 3, 4, 7), default=[1, 2, 3, 4, 7], help="measure only these rows"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.epochs = 1, 20
    warnings.filterwarnings("ignore")
    quiet_expected_warnings()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results: dict[str, dict[str, list[float]]] = {}
    table: list[tuple[str, str, str, str]] = []
    if 1 in args.rows or 2 in args.rows:
        with tempfile.TemporaryDirectory() as root:
            template_fit(5, root)()  # warm-up: imports, first-call costs
            if 1 in args.rows:
                toy_rows(args, root, results, table)
            if 2 in args.rows:
                monitor_rows(args, root, results, table)
    if 7 in args.rows:
        with tempfile.TemporaryDirectory() as root:
            study_rows(args, root, results, table)
    source = None
    if 3 in args.rows:
        source = mnist_rows(args, results, table)
    if 4 in args.rows:
        row4 = startup(1 if args.quick else args.repeats)
        results["4 startup"] = row4
        for name, values in row4.items():
            table.append((f"4. {name}", *fmt(values), ""))
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}")
    if source:
        print(f"data for rows 3 and 6: {source}")
    width = max(len(r[0]) for r in table)
    print(f"{'row':<{width}}  {'median':>16}  {'min-max':>15}  note")
    for name, median, spread, note in table:
        print(f"{name:<{width}}  {median:>16}  {spread:>15}  {note}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "table": table}, indent=2))


if __name__ == "__main__":
    main()
