"""Run a grid of ordinary logged runs (activations x depths x seeds [x optimizers]) and summarise it.

    python -m src.study configs/study/vanishing.yaml [--workers N] [--out DIR]

The study file names a base experiment config and the grid; each point is a normal fit of
``python -m src.train`` (same CLI, own TensorBoard run under ``OUT/runs/``), run in worker
processes. Writes ``OUT/summary.csv`` (one row per run), ``OUT/summary.md`` (one row per grid
point over the seeds) and ``OUT/final_loss_vs_depth.png``, and prints progress as runs finish.

Study file keys: ``base_config``, ``out_dir``, ``activations``, ``depths``, ``seeds``,
``optimizers`` (optional: ``{label: {class_path, init_args}}``), ``policies`` (optional:
``{label: config mapping or null}``, each stacked on ``config``: for example with and without
``PlateauEscape``), ``config`` (a config mapping
stacked on ``base_config`` for every run, as a second ``--config`` would be), ``args`` (extra CLI
options for every run), ``stalled_above`` (a final train loss above it counts as stalled) and
``solved_below`` (the loss whose first epoch below it is reported) and ``stop_below`` (optional:
a run stops once its train loss is below it, through Lightning's ``EarlyStopping(stopping_threshold=)``;
it must be at most ``solved_below`` and ``stalled_above``, so that neither column changes).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from src.errors import fail, one_line_errors
from src.names import TRAIN_LOSS

REPO = Path(__file__).resolve().parent.parent
KEYS = {
    "base_config", "out_dir", "activations", "depths", "seeds", "optimizers", "policies", "config", "args",
    "stalled_above", "solved_below", "stop_below",
}  # fmt: skip


class StudyError(ValueError):
    """A study file that cannot be run; the message names the key."""


def load_study(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file (see configs/study/vanishing.yaml)")
    try:
        study = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    unknown = set(study) - KEYS
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {sorted(unknown)}; a study takes {', '.join(sorted(KEYS))}")
    for key in ("activations", "depths", "seeds"):
        if not isinstance(study.get(key), list) or not study[key]:
            raise StudyError(f"{path}: '{key}' must be a non-empty list")
    if any(not isinstance(d, int) or d < 1 for d in study["depths"]):
        raise StudyError(f"{path}: 'depths' must be positive integers, got {study['depths']}")
    base = Path(study.get("base_config", REPO / "configs" / "default.yaml"))
    study["base_config"] = str((base if base.is_absolute() or base.is_file() else REPO / base).resolve())
    if not Path(study["base_config"]).is_file():
        raise StudyError(f"{path}: base_config {base} does not exist")
    optimizers = study.get("optimizers") or {"config": None}
    if not isinstance(optimizers, dict):
        raise StudyError(f"{path}: 'optimizers' must map a label to {{class_path, init_args}}")
    study["optimizers"] = optimizers
    policies = study.get("policies") or {"config": None}
    if not isinstance(policies, dict) or any(p is not None and not isinstance(p, dict) for p in policies.values()):
        raise StudyError(f"{path}: 'policies' must map a label to a config mapping (or null for none)")
    study["policies"] = policies
    if not isinstance(study.setdefault("config", {}), dict):
        raise StudyError(f"{path}: 'config' must be a mapping of config sections, like a config file's")
    study.setdefault("args", [])
    study.setdefault("stalled_above", 0.5)
    study.setdefault("solved_below", 0.05)
    stop = study.setdefault("stop_below", None)
    if stop is not None and (not isinstance(stop, (int, float)) or not 0 < stop <= study["solved_below"]):
        raise StudyError(
            f"{path}: 'stop_below' must be a loss in (0, solved_below = {study['solved_below']}] or null, got {stop!r}"
        )
    study.setdefault("out_dir", f"studies/{path.stem}")
    return study


def grid(study: dict[str, Any]) -> list[dict[str, Any]]:
    axes = (study["policies"], study["optimizers"], study["activations"], study["depths"], study["seeds"])
    return [
        {"activation": a, "depth": d, "seed": s, "optimizer": o, "policy": p}
        for p, o, a, d, s in itertools.product(*axes)
    ]


def run_name(point: dict[str, Any]) -> str:
    suffix = "" if point["optimizer"] == "config" else f"_{point['optimizer']}"
    suffix += "" if point.get("policy", "config") == "config" else f"_{point['policy']}"
    return f"{point['activation']}_d{point['depth']:02d}_s{point['seed']}{suffix}"


def run_args(study: dict[str, Any], point: dict[str, Any], out_dir: str) -> list[str]:
    """The CLI options of one grid point's run (what ``python -m src.train fit`` would be given)."""
    args = [
        "--config", study["base_config"], *(["--config", yaml.safe_dump(study["config"])] if study["config"] else []),
        *(["--config", yaml.safe_dump(policy)] if (policy := study["policies"][point["policy"]]) else []),
        *study["args"],
        f"--model.activation={point['activation']}", f"--model.depth={point['depth']}",
        f"--seed_everything={point['seed']}",
        f"--trainer.default_root_dir={Path(out_dir) / 'runs' / run_name(point)}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    optimizer = study["optimizers"][point["optimizer"]]
    if optimizer is not None:
        args.append(f"--optimizer={json.dumps(optimizer)}")
    return args


def run_point(study: dict[str, Any], point: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """One fit, in a worker process; returns its row of the summary."""
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    from src.callbacks import PlateauDetector
    from src.cli import TemplateCLI, quiet_expected_warnings

    torch.set_num_threads(1)  # the workers share the cores
    warnings.filterwarnings("ignore")
    quiet_expected_warnings()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class FirstBelow(L.Callback):
        epoch = None

        def on_train_epoch_end(self, trainer, pl_module):
            loss = trainer.callback_metrics.get(TRAIN_LOSS)
            if self.epoch is None and loss is not None and float(loss) < study["solved_below"]:
                self.epoch = trainer.current_epoch

    args = run_args(study, point, out_dir)
    start = time.perf_counter()
    cli = TemplateCLI(args=args, run=False, save_config_kwargs={"overwrite": True})
    probe = FirstBelow()
    cli.trainer.callbacks.append(probe)
    if study["stop_below"] is not None:  # converged: the rest of the run would not change its row's verdicts
        stop = EarlyStopping(
            TRAIN_LOSS, patience=sys.maxsize, stopping_threshold=study["stop_below"], check_on_train_epoch_end=True
        )
        cli.trainer.callbacks.append(stop)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    final = float(cli.trainer.callback_metrics[TRAIN_LOSS])
    detector = next((cb for cb in cli.trainer.callbacks if isinstance(cb, PlateauDetector)), None)
    stalls = [e for e in (detector.events if detector else []) if e["kind"] == "stall"]
    return {
        **point,
        "run": run_name(point),
        "final_loss": final,
        "stalled": final > study["stalled_above"],
        "diagnosis": stalls[0]["diagnosis"] if stalls else "",
        "first_stall_epoch": stalls[0]["epoch"] if stalls else "",
        f"epoch_below_{study['solved_below']}": probe.epoch if probe.epoch is not None else "",
        "epochs": cli.trainer.current_epoch,
        "seconds": round(time.perf_counter() - start, 1),
        "log_dir": cli.trainer.log_dir,
    }


def aggregate(rows: list[dict[str, Any]], study: dict[str, Any]) -> list[dict[str, Any]]:
    below = f"epoch_below_{study['solved_below']}"
    table = []
    fields = ("policy", "optimizer", "activation", "depth")
    for key in sorted({tuple(r[f] for f in fields) for r in rows}):
        group = [r for r in rows if tuple(r[f] for f in fields) == key]
        escapes = [r[below] for r in group if r[below] != ""]
        diagnoses = sorted({r["diagnosis"] for r in group if r["diagnosis"]})
        table.append({
            **dict(zip(fields, key, strict=True)),
            "median_final_loss": statistics.median(r["final_loss"] for r in group),
            "stalled": f"{sum(r['stalled'] for r in group)}/{len(group)}",
            f"below_{study['solved_below']}": f"{len(escapes)}/{len(group)}",
            "diagnosis": ", ".join(diagnoses) or "-",
            f"median_{below}": statistics.median(escapes) if escapes else "-",
        })  # fmt: skip
    return table


def write_outputs(rows: list[dict[str, Any]], study: dict[str, Any], out_dir: Path, command: str) -> None:
    rows = sorted(rows, key=lambda r: (r["policy"], r["optimizer"], r["activation"], r["depth"], r["seed"]))
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = aggregate(rows, study)
    header = list(table[0])
    for axis, column in (("optimizers", "optimizer"), ("policies", "policy")):
        if len(study[axis]) == 1:
            header.remove(column)
    lines = [f"`{command}`", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in table:
        cells = [f"{row[h]:.4g}" if h.startswith("median_epoch") and row[h] != "-" else
                 f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in header]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    plot_final_loss(table, out_dir / "final_loss_vs_depth.png")


def plot_final_loss(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, optimizer, activation in sorted({(r["policy"], r["optimizer"], r["activation"]) for r in table}):
        points = [r for r in table if (r["policy"], r["optimizer"], r["activation"]) == (policy, optimizer, activation)]
        label = ", ".join([activation] + [v for v in (optimizer, policy) if v != "config"])
        losses = [max(r["median_final_loss"], 1e-8) for r in points]
        ax.plot([r["depth"] for r in points], losses, marker="o", label=label)
    ax.axhline(0.6931, color="gray", linestyle="--", linewidth=0.8, label="ln 2 (chance)")
    ax.set_yscale("log")
    ax.set_xlabel("depth (Linear layers)")
    ax.set_ylabel("median final train loss over seeds")
    ax.set_title("where deep MLPs stop learning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study YAML file, e.g. configs/study/vanishing.yaml")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (default: cores)")
    parser.add_argument("--out", help="output folder (default: the study's out_dir)")
    args = parser.parse_args(argv)
    with one_line_errors(StudyError, status=2):
        study = load_study(args.study)
        if args.workers < 1:
            raise StudyError(f"--workers must be >= 1, got {args.workers}")
    out_dir = Path(args.out or study["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    points = grid(study)
    workers = min(args.workers, len(points))
    print(f"{len(points)} runs in {workers} processes, logs under {out_dir / 'runs'}", flush=True)
    start, rows = time.perf_counter(), []
    context = multiprocessing.get_context("spawn")
    # The overall bar on stderr; one line per finished run on stdout, printed above it.
    bar = tqdm(total=len(points), desc="study", unit="run", file=sys.stderr, dynamic_ncols=True)
    with bar, ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_point, study, p, str(out_dir)): p for p in points}
        for done, future in enumerate(as_completed(futures), start=1):
            point = futures[future]
            bar.update(1)
            try:
                row = future.result()
            except Exception as err:  # one failed run must not lose the others
                bar.write(f"[{done}/{len(points)}] {run_name(point)}: FAILED ({err})", file=sys.stdout)
                continue
            rows.append(row)
            state = f"stalled ({row['diagnosis'] or 'no event'})" if row["stalled"] else "learned"
            elapsed = time.perf_counter() - start
            bar.write(f"[{done}/{len(points)}] {row['run']}: final loss {row['final_loss']:.4g}, {state} "
                      f"after {row['epochs']} epochs ({elapsed:.0f} s elapsed)", file=sys.stdout)  # fmt: skip
            bar.set_postfix(learned=sum(not r["stalled"] for r in rows), stalled=sum(r["stalled"] for r in rows))
    if not rows:
        fail("every run failed; run one alone with python -m src.train to see why")
    command = "python -m src.study " + " ".join(sys.argv[1:] if argv is None else argv)
    write_outputs(rows, study, out_dir, command)
    print((out_dir / "summary.md").read_text())
    print(f"wrote {out_dir / 'summary.csv'}, {out_dir / 'summary.md'}, {out_dir / 'final_loss_vs_depth.png'}")


if __name__ == "__main__":
    main()
