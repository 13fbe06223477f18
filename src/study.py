"""Run a grid of ordinary logged runs over any config options and summarise it.

    python -m src.study configs/study/vanishing.yaml [--workers N] [--out DIR] [--base-config FILE]

The study file names a base experiment config and the axes of the grid; each point is a normal fit
of ``python -m src.train`` (same CLI, own TensorBoard run under ``OUT/runs/``), run in worker
processes. Writes ``OUT/summary.csv`` (one row per run: the axes first, then the results),
``OUT/summary.md`` (one row per grid point over the seeds, with a column for each axis that varies,
then every run) and, when depth varies, ``OUT/final_loss_vs_depth.png``; prints progress as runs finish.

Axes (any mix; at least one):

- ``grid``: ``{option: [values]}``, any option ``python -m src.train`` takes, for example
  ``{model.init: [default, kaiming_normal], model.dropout: [0.0, 0.3]}``: every combination runs.
- ``variants``: ``{label: {option: value, ...}}``: named settings, one axis (``variant``), for
  experiments that are a list rather than a product (the MNIST labs).
- Shorthands: ``activations`` (``model.activation``), ``depths`` (``model.depth``), ``seeds``
  (``seed_everything``; the table aggregates over them), ``optimizers`` (``{label: {class_path,
  init_args}}``) and ``policies`` (``{label: config mapping or null}``, each stacked on ``config``:
  for example with and without ``PlateauEscape``).

Every option and value is checked by the CLI's own parser before any run starts; a bad one ends
the study in one line that names it.

Other keys: ``base_config``, ``out_dir``, ``config`` (a config mapping stacked on ``base_config`` for
every run, as a second ``--config`` would be), ``args`` (extra CLI options for every run),
``test`` (``true``: run ``trainer.test`` after each fit), ``metrics`` (metrics whose final value
each run reports, e.g. ``[test/acc]``; the table shows their median over seeds), ``count_below``
(``{metric: threshold}``: how many runs of each row end below it), ``stalled_above`` (a final train
loss above it counts as stalled; default 0.5, ``null`` leaves the column out), ``solved_below`` (the
train loss whose first epoch below it is reported; default 0.05, ``null`` leaves it out) and
``stop_below`` (optional: a run stops once its train loss is below it, through Lightning's
``EarlyStopping(stopping_threshold=)``; it must be at most ``solved_below`` and ``stalled_above``,
so that neither column changes).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import multiprocessing
import os
import re
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from src.errors import fail, one_line, one_line_errors
from src.names import TRAIN_LOSS

REPO = Path(__file__).resolve().parent.parent
AXIS_KEYS = ("policies", "optimizers", "variants", "activations", "depths", "grid", "seeds")
KEYS = {
    *AXIS_KEYS, "base_config", "out_dir", "config", "args", "test", "metrics", "count_below",
    "stalled_above", "solved_below", "stop_below",
}  # fmt: skip
# shorthand key -> (its column in the summary, the option it sets)
SHORTHANDS = {"activations": ("activation", "model.activation"), "depths": ("depth", "model.depth"),
              "seeds": ("seed", "seed_everything")}  # fmt: skip
SCALAR = (str, int, float, bool, type(None))


class StudyError(ValueError):
    """A study file that cannot be run; the message names the key."""


@dataclass
class Axis:
    """One axis of the grid: its summary column, and what each of its labels adds to a run's options.

    ``kind`` is ``option`` (``--OPTION=label``), ``options`` (a variant: several options), ``optimizer``
    (``--optimizer=...``) or ``config`` (a policy: one more ``--config``)."""

    column: str
    kind: str
    values: dict[Any, Any]  # label -> payload
    option: str | None = None
    key: str = ""  # the study-file key that made it, for error messages

    def args(self, label: Any) -> list[str]:
        payload = self.values[label]
        if self.kind == "option":
            return [f"--{self.option}={encode(payload)}"]
        if self.kind == "options":
            return [f"--{option}={encode(value)}" for option, value in payload.items()]
        if self.kind == "optimizer":
            return [] if payload is None else [f"--optimizer={json.dumps(payload)}"]
        return [] if payload is None else ["--config", yaml.safe_dump(payload)]

    def sets(self) -> list[str]:
        """The options this axis sets (a policy's config fragment: none named here)."""
        if self.kind == "option":
            return [self.option]
        if self.kind == "options":
            return list(dict.fromkeys(option for payload in self.values.values() for option in payload))
        return ["optimizer"] if self.kind == "optimizer" else []

    def describe(self, label: Any) -> str:
        if self.key == "grid":
            return f"grid option '{self.option}' value {label!r}"
        if self.key in SHORTHANDS:
            return f"'{self.key}' value {label!r}"
        return f"{self.column} '{label}'"  # variant, optimizer, policy


def encode(value: Any) -> str:
    """A YAML/JSON value as the CLI reads it after ``--option=``."""
    return value if isinstance(value, str) else json.dumps(value)


def _option_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", name):
        raise StudyError(f"{where}: {name!r} is not an option name (dotted, as on the command line: model.init)")
    return name


def _axes(study: dict[str, Any], path: Path) -> list[Axis]:
    axes: list[Axis] = []
    for key in AXIS_KEYS:
        if study.get(key) is None:
            continue
        spec = study[key]
        if key in SHORTHANDS:
            column, option = SHORTHANDS[key]
            if not isinstance(spec, list) or not spec or not all(isinstance(v, SCALAR) for v in spec):
                raise StudyError(f"{path}: '{key}' must be a non-empty list of values")
            if key == "depths" and any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in spec):
                raise StudyError(f"{path}: 'depths' must be positive integers, got {spec}")
            axes.append(Axis(column, "option", {v: v for v in spec}, option, key))
        elif key == "grid":
            if not isinstance(spec, dict) or not spec:
                example = "{model.init: [default, xavier_normal]}"
                raise StudyError(f"{path}: 'grid' must map an option to a list of values, e.g. {example}")
            for option, values in spec.items():
                _option_name(option, f"{path}: grid")
                if not isinstance(values, list) or not values:
                    raise StudyError(f"{path}: grid option '{option}' must have a non-empty list of values")
                if not all(isinstance(v, SCALAR) for v in values):
                    raise StudyError(
                        f"{path}: grid option '{option}' takes plain values (numbers, strings, true/false, null); "
                        "for a list or mapping use variants: {label: {option: value}}"
                    )
                axes.append(Axis(option, "option", {v: v for v in values}, option, key))
        else:
            if not isinstance(spec, dict) or not spec:
                raise StudyError(f"{path}: '{key}' must map a label to its settings")
            kind, column = {"variants": ("options", "variant"), "optimizers": ("optimizer", "optimizer"),
                            "policies": ("config", "policy")}[key]  # fmt: skip
            for label, value in spec.items():
                if key == "variants" and not isinstance(value, dict):
                    raise StudyError(f"{path}: variant '{label}' must map options to values, e.g. {{model.depth: 1}}")
                if key == "variants":
                    for option in value:
                        _option_name(option, f"{path}: variant '{label}'")
                if key == "optimizers" and value is not None and not isinstance(value, dict):
                    raise StudyError(f"{path}: 'optimizers' must map a label to {{class_path, init_args}}")
                if key == "policies" and value is not None and not isinstance(value, dict):
                    raise StudyError(f"{path}: 'policies' must map a label to a config mapping (or null for none)")
            axes.append(Axis(column, kind, dict(spec), None, key))
    if not axes:
        raise StudyError(f"{path}: no axis; give grid: {{option: [values]}}, variants, or activations/depths/seeds")
    # two axes that set one option: the later would silently win
    setters: dict[str, str] = {}
    for axis in axes:
        for option in axis.sets():
            if option in setters and setters[option] != axis.key:
                raise StudyError(f"{path}: '{option}' is set by both '{setters[option]}' and '{axis.key}'; keep one")
            setters[option] = axis.key
    return axes


def load_study(path: str | Path, base_config: str | None = None) -> dict[str, Any]:
    """Read and check a study file; ``base_config`` replaces the file's (``--base-config``)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file (see configs/study/vanishing.yaml)")
    try:
        study = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(study, dict):
        raise StudyError(f"{path}: a study file is a mapping of keys ({', '.join(sorted(KEYS))})")
    unknown = set(study) - KEYS
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {sorted(unknown)}; a study takes {', '.join(sorted(KEYS))}")
    study["axes"] = _axes(study, path)
    if base_config is not None:
        study["base_config"] = base_config
    base = Path(study.get("base_config", REPO / "configs" / "default.yaml"))
    study["base_config"] = str((base if base.is_absolute() or base.is_file() else REPO / base).resolve())
    if not Path(study["base_config"]).is_file():
        raise StudyError(f"{path}: base_config {base} does not exist")
    if not isinstance(study.setdefault("config", {}) or {}, dict):
        raise StudyError(f"{path}: 'config' must be a mapping of config sections, like a config file's")
    study["config"] = study["config"] or {}
    if not isinstance(study.setdefault("args", []), list):
        raise StudyError(f"{path}: 'args' must be a list of CLI options, e.g. [--trainer.max_epochs=300]")
    if not isinstance(study.setdefault("test", False), bool):
        raise StudyError(f"{path}: 'test' must be true or false")
    metrics = study.setdefault("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise StudyError(f"{path}: 'metrics' must be a list of metric names, e.g. [test/acc]")
    count_below = study.setdefault("count_below", {})
    if not isinstance(count_below, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in count_below.items()
    ):
        raise StudyError(f"{path}: 'count_below' must map a metric name to a number, e.g. {{val/prob_mae: 0.03}}")
    study["metrics"] = list(dict.fromkeys([*metrics, *count_below]))  # a counted metric is reported too
    for key, default in (("stalled_above", 0.5), ("solved_below", 0.05)):
        value = study.setdefault(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise StudyError(f"{path}: '{key}' must be a positive loss or null (no such column), got {value!r}")
    stop = study.setdefault("stop_below", None)
    limits = [(study[k], k) for k in ("solved_below", "stalled_above") if study[k] is not None]
    bound, name = min(limits) if limits else (float("inf"), "inf")
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0 < stop <= bound):
        raise StudyError(f"{path}: 'stop_below' must be a loss in (0, {name} = {bound}] or null, got {stop!r}")
    study.setdefault("out_dir", f"studies/{path.stem}")
    study["path"] = str(path)
    return study


def grid(study: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of the grid: ``{column: label}`` for each axis, in axis order (seeds vary fastest)."""
    axes = study["axes"]
    return [dict(zip((a.column for a in axes), labels, strict=True))
            for labels in itertools.product(*(list(a.values) for a in axes))]  # fmt: skip


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text)


def run_name(point: dict[str, Any], study: dict[str, Any] | None = None) -> str:
    """A folder name for the point: ``sigmoid_d07_s0``, ``he_dropout-0.3``, ``xavier_s2_default``..."""
    axes = study["axes"] if study else [Axis(c, "", {}) for c in point]
    first, middle, last = [], [], []
    for axis in axes:
        label = point[axis.column]
        if axis.column in ("variant", "activation"):
            first.append(str(label))
        elif axis.column == "depth":
            first.append(f"d{label:02d}" if isinstance(label, int) else f"d{label}")
        elif axis.column == "seed":
            last.insert(0, f"s{label}")
        elif axis.column in ("optimizer", "policy"):
            last += [] if label == "config" else [str(label)]
        else:
            middle.append(f"{axis.column.rsplit('.', 1)[-1]}-{label}")
    return _safe("_".join(first + middle + last) or "run")


def run_args(study: dict[str, Any], point: dict[str, Any], out_dir: str, axes: list[Axis] | None = None) -> list[str]:
    """The CLI options of one grid point's run (what ``python -m src.train fit`` would be given); with
    ``axes``, only those axes' options (``point`` then needs only their columns)."""
    axes = study["axes"] if axes is None else axes
    name = run_name(point, study) if axes is study["axes"] else "check"
    configs = [a for a in axes if a.kind == "config"]
    options = [a for a in axes if a.kind != "config"]
    return [
        "--config", study["base_config"], *(["--config", yaml.safe_dump(study["config"])] if study["config"] else []),
        *(arg for axis in configs for arg in axis.args(point[axis.column])),
        *study["args"],
        *(arg for axis in options for arg in axis.args(point[axis.column])),
        f"--trainer.default_root_dir={Path(out_dir) / 'runs' / name}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip


_CHECKER: dict[str, Any] = {}  # the CLI's parser (about 1 s to build) and its error class, once per process


def _checker() -> dict[str, Any]:
    """The classes that parse a run's options without building anything; the parser itself is added
    by :func:`check_options` once it has been built."""
    if not _CHECKER:
        from lightning.pytorch.cli import LightningArgumentParser

        from src.cli import TemplateCLI

        class Rejected(Exception):
            pass

        class RaisingParser(LightningArgumentParser):
            def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
                raise Rejected(message)

        class ParseOnly(TemplateCLI):
            def instantiate_classes(self) -> None:  # parse and check, build nothing
                pass

        _CHECKER.update(rejected=Rejected, parser_class=RaisingParser, cli=ParseOnly)
    return _CHECKER


def check_options(study: dict[str, Any]) -> None:
    """Parse the study's options with the CLI's own parser, building nothing: first the shared settings
    (``config``, ``args``), then each value of each axis on its own, so that a bad option name or value
    fails in one line naming the axis and the value, before any run starts."""
    from src.cli import quiet_expected_warnings

    quiet_expected_warnings()
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0" of each parse
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")  # the study's own argv
    where, checker = study["path"], _checker()
    failures = (checker["rejected"], ValueError, TypeError)
    try:
        if "parser" not in checker:
            base = ["--config", study["base_config"]]
            checker["parser"] = checker["cli"](args=base, run=False, parser_class=checker["parser_class"]).parser
        parser = checker["parser"]
        parser.parse_args(run_args(study, {}, "check", axes=[]))
    except failures as err:
        raise StudyError(f"{where}: base_config, config or args: {one_line(err)}") from None
    for axis in study["axes"]:
        for label in axis.values:
            try:
                parser.parse_args(run_args(study, {axis.column: label}, "check", axes=[axis]))
            except failures as err:
                raise StudyError(f"{where}: {axis.describe(label)}: {one_line(err)}") from None


def prepare_run(study: dict[str, Any], point: dict[str, Any], out_dir: str) -> tuple[Any, Any]:
    """One grid point's run as a worker builds it, not yet fitted: the ``TemplateCLI`` (its trainer,
    model and data module) and the callback that notes the first epoch below ``solved_below``."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    from src.cli import TemplateCLI, quiet_expected_warnings

    torch.set_num_threads(1)  # the workers share the cores
    warnings.filterwarnings("ignore")
    quiet_expected_warnings()
    for name in ("lightning.pytorch", "lightning.fabric.utilities.seed"):  # a line per run would break the bar
        logging.getLogger(name).setLevel(logging.ERROR)

    class FirstBelow(L.Callback):
        epoch = None

        def on_train_epoch_end(self, trainer, pl_module):
            loss = trainer.callback_metrics.get(TRAIN_LOSS)
            if self.epoch is None and loss is not None and float(loss) < study["solved_below"]:
                self.epoch = trainer.current_epoch

    cli = TemplateCLI(args=run_args(study, point, out_dir), run=False, save_config_kwargs={"overwrite": True})
    probe = FirstBelow()
    if study["solved_below"] is not None:
        cli.trainer.callbacks.append(probe)
    if study["stop_below"] is not None:  # converged: the rest of the run would not change its row's verdicts
        stop = EarlyStopping(
            TRAIN_LOSS, patience=sys.maxsize, stopping_threshold=study["stop_below"], check_on_train_epoch_end=True
        )
        cli.trainer.callbacks.append(stop)
    return cli, probe


def run_point(study: dict[str, Any], point: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """One fit (and test, with ``test: true``), in a worker process; returns its row of the summary."""
    from src.callbacks import PlateauDetector

    start = time.perf_counter()
    cli, probe = prepare_run(study, point, out_dir)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    final = float(cli.trainer.callback_metrics[TRAIN_LOSS])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    epochs = cli.trainer.current_epoch
    if study["test"]:
        for result in cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    detector = next((cb for cb in cli.trainer.callbacks if isinstance(cb, PlateauDetector)), None)
    stalls = [e for e in (detector.events if detector else []) if e.is_stall]
    row = {**point, "run": run_name(point, study), "final_loss": final}
    if study["stalled_above"] is not None:
        row["stalled"] = final > study["stalled_above"]
    if detector is not None:
        row["diagnosis"] = stalls[0].diagnosis if stalls else ""
        row["first_stall_epoch"] = stalls[0].epoch if stalls else ""
    if study["solved_below"] is not None:
        row[f"epoch_below_{study['solved_below']}"] = probe.epoch if probe.epoch is not None else ""
    for name in study["metrics"]:
        row[name] = metrics.get(name, "")
    row |= {"epochs": epochs, "seconds": round(time.perf_counter() - start, 1), "log_dir": cli.trainer.log_dir}
    return row


def axis_columns(rows: list[dict[str, Any]], marker: str = "run") -> list[str]:
    """The axes of a summary: its columns before ``run`` (before ``runs`` in an aggregated table)."""
    columns = list(rows[0])
    return columns[: columns.index(marker)]


def aggregate(rows: list[dict[str, Any]], study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per grid point over the seeds: every axis but the seed, then the results."""
    fields = [c for c in axis_columns(rows) if c != "seed"]
    below = f"epoch_below_{study.get('solved_below')}"
    order = _ordering(study)
    keys = sorted(
        {tuple(r[f] for f in fields) for r in rows}, key=lambda k: [order(*fk) for fk in zip(fields, k, strict=True)]
    )
    groups = [[r for r in rows if tuple(r[f] for f in fields) == key] for key in keys]
    median = "median " if max(len(g) for g in groups) > 1 else ""  # the same headers on every row
    table = []
    for key, group in zip(keys, groups, strict=True):
        row: dict[str, Any] = {**dict(zip(fields, key, strict=True)), "runs": len(group)}
        row["median_final_loss" if median else "final_loss"] = statistics.median(r["final_loss"] for r in group)
        if "stalled" in group[0]:
            row["stalled"] = f"{sum(r['stalled'] for r in group)}/{len(group)}"
        escapes = [r[below] for r in group if r.get(below, "") != ""]
        if below in group[0]:
            row[f"below_{study['solved_below']}"] = f"{len(escapes)}/{len(group)}"
        if "diagnosis" in group[0]:
            row["diagnosis"] = ", ".join(sorted({r["diagnosis"] for r in group if r["diagnosis"]})) or "-"
        if below in group[0]:
            row[f"median_{below}"] = statistics.median(escapes) if escapes else "-"
        for name in study.get("metrics", []):
            values = [r[name] for r in group if r.get(name, "") != ""]
            row[f"{median}{name}"] = statistics.median(values) if values else "-"
        for name, threshold in study.get("count_below", {}).items():
            hits = sum(r.get(name, "") != "" and r[name] < threshold for r in group)
            row[f"{name} < {threshold}"] = f"{hits}/{len(group)}"
        table.append(row)
    return table


def _ordering(study: dict[str, Any]):
    """``order(column, label)``: a label's place on its axis as the study file lists it; numbers
    numeric for a summary read back without its study file."""
    places = {axis.column: {label: i for i, label in enumerate(axis.values)} for axis in study.get("axes", [])}
    return lambda column, label: (places[column][label], 0, "") if column in places else _order(label)


def _order(value: Any) -> tuple:
    """Sort key that keeps numbers numeric and puts ``None`` first."""
    return (0, 0, "") if value is None else (1, value, "") if isinstance(value, (int, float)) else (2, 0, str(value))


def _cell(value: Any, header: str, axes: list[str]) -> str:
    if isinstance(value, float) and header not in axes:  # an axis shows its values as written
        return f"{value:.4g}" if "epoch" in header else f"{value:.1f}" if header == "seconds" else f"{value:.4f}"
    return str(value)


def _markdown(rows: list[dict[str, Any]], header: list[str], axes: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(row.get(h, ""), h, axes) for h in header) + " |" for row in rows]
    return lines


def write_outputs(rows: list[dict[str, Any]], study: dict[str, Any], out_dir: Path, command: str) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and (when depth varies) the plot; returns the paths written."""
    axes = axis_columns(rows)
    order = _ordering(study)
    rows = sorted(rows, key=lambda r: [order(c, r[c]) for c in axes])
    columns = list(dict.fromkeys(c for r in rows for c in r))  # a failed metric may miss in some rows
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    table = aggregate(rows, study)
    varying = [c for c in axes if len({r[c] for r in rows}) > 1]
    fixed = [f"{c} {rows[0][c]}" for c in axes if c not in varying]
    results = [h for h in table[0] if h not in axes and h != "runs"]
    header = [c for c in varying if c != "seed"] + (["runs"] if any(t["runs"] > 1 for t in table) else []) + results
    lines = [f"`{command}`", ""]
    if fixed:
        lines += [f"The same in every run: {', '.join(fixed)}.", ""]
    lines += _markdown(table, header, axes)
    run_header = [*varying, *(c for c in columns if c not in axes and c not in ("run", "log_dir"))]
    if len(rows) > len(table):
        lines += ["", "Every run:", "", *_markdown(rows, run_header, axes)]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    written = [out_dir / "summary.csv", out_dir / "summary.md"]
    if "depth" in varying:
        plot_final_loss(table, out_dir / "final_loss_vs_depth.png")
        written.append(out_dir / "final_loss_vs_depth.png")
    return written


def load_summary(path: Path) -> list[dict[str, Any]]:
    """A study's ``summary.csv`` back as rows with numbers, booleans and empty cells as written."""

    def parse(text: str) -> Any:
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_final_loss(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [c for c in axis_columns(table, "runs") if c != "depth"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({tuple(r[c] for c in others) for r in table}, key=lambda k: [_order(v) for v in k]):
        points = sorted((r for r in table if tuple(r[c] for c in others) == key), key=lambda r: r["depth"])
        label = ", ".join(str(v) for v in key if v != "config") or "median"
        losses = [max(r.get("median_final_loss", r.get("final_loss")), 1e-8) for r in points]
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
    parser.add_argument(
        "--base-config", help="run the grid on this experiment config instead of the file's base_config "
        "(e.g. configs/mnist.yaml for the MNIST labs on MNIST)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    with one_line_errors(StudyError, status=2):
        study = load_study(args.study, args.base_config)
        if args.workers < 1:
            raise StudyError(f"--workers must be >= 1, got {args.workers}")
        check_options(study)
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
                bar.write(f"[{done}/{len(points)}] {run_name(point, study)}: FAILED ({one_line(err)})", file=sys.stdout)
                continue
            rows.append(row)
            state = "" if "stalled" not in row else \
                f", stalled ({row.get('diagnosis') or 'no event'})" if row["stalled"] else ", learned"  # fmt: skip
            shown = "".join(f", {m} {row[m]:.4g}" for m in study["metrics"] if row.get(m, "") != "")
            elapsed = time.perf_counter() - start
            bar.write(f"[{done}/{len(points)}] {row['run']}: final loss {row['final_loss']:.4g}{shown}{state} "
                      f"after {row['epochs']} epochs ({elapsed:.0f} s elapsed)", file=sys.stdout)  # fmt: skip
            if "stalled" in row:
                bar.set_postfix(learned=sum(not r["stalled"] for r in rows), stalled=sum(r["stalled"] for r in rows))
    if not rows:
        fail("every run failed; run one alone with python -m src.train to see why")
    for name in study["metrics"]:
        missing = [r["run"] for r in rows if r.get(name, "") == ""]
        if missing:
            print(f"note: {len(missing)} run(s) logged no {name} ({', '.join(missing[:3])}...); "
                  f"is it logged{' (test: true runs trainer.test)' if name.startswith('test/') else ''}?")  # fmt: skip
    command = "python -m src.study " + " ".join(sys.argv[1:] if argv is None else argv)
    written = write_outputs(rows, study, out_dir, command)
    print((out_dir / "summary.md").read_text())
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
