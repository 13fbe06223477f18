"""A study's results: ``summary.csv`` (a row per run), ``summary.md`` (a row per grid point), read back too."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from .spec import Study


def axis_columns(rows: list[dict[str, Any]], marker: str = "run") -> list[str]:
    """The axes of a summary: its columns before ``run`` (before ``runs`` in an aggregated table)."""
    columns = list(rows[0])
    return columns[: columns.index(marker)]


def aggregate(rows: list[dict[str, Any]], study: Study) -> list[dict[str, Any]]:
    """One row per grid point over the seeds: every axis but the seed, then the results."""
    fields = [c for c in axis_columns(rows) if c != "seed"]
    below = f"epoch_below_{study.solved_below}"
    order = _ordering(study)
    keys = sorted(
        {tuple(r[f] for f in fields) for r in rows}, key=lambda k: [order(*fk) for fk in zip(fields, k, strict=True)]
    )
    groups = [[r for r in rows if tuple(r[f] for f in fields) == key] for key in keys]
    median = "median " if max(len(g) for g in groups) > 1 else ""  # the same headers on every row
    failures = any(r.get("status") == "failed" for r in rows)
    has = {c for r in rows for c in r}  # a failed run's row has only its axes, name and error
    table = []
    for key, group in zip(keys, groups, strict=True):
        row: dict[str, Any] = {**dict(zip(fields, key, strict=True)), "runs": len(group)}
        losses = [r["final_loss"] for r in group if r.get("final_loss", "") != ""]  # a run that failed has none
        row["median_final_loss" if median else "final_loss"] = statistics.median(losses) if losses else "-"
        if "stalled" in has:
            row["stalled"] = f"{sum(bool(r.get('stalled')) for r in group)}/{len(group)}"
        escapes = [r[below] for r in group if r.get(below, "") != ""]
        if below in has:
            row[f"below_{study.solved_below}"] = f"{len(escapes)}/{len(group)}"
        if "diagnosis" in has:
            row["diagnosis"] = ", ".join(sorted({r["diagnosis"] for r in group if r.get("diagnosis")})) or "-"
        if below in has:
            row[f"median_{below}"] = statistics.median(escapes) if escapes else "-"
        if failures:
            row["failed"] = f"{sum(r.get('status') == 'failed' for r in group)}/{len(group)}"
        for name in study.metrics:
            values = [r[name] for r in group if r.get(name, "") != ""]
            row[f"{median}{name}"] = statistics.median(values) if values else "-"
        for name, threshold in study.count_below.items():
            hits = sum(r.get(name, "") != "" and r[name] < threshold for r in group)
            row[f"{name} < {threshold}"] = f"{hits}/{len(group)}"
        table.append(row)
    return table


def _ordering(study: Study):
    """``order(column, label)``: a label's place on its axis as the study file lists it; numbers
    numeric for a summary read back without its study file."""
    places = {axis.column: {label: i for i, label in enumerate(axis.values)} for axis in study.axes}
    return lambda column, label: (places[column][label], 0, "") if column in places else order_key(label)


def order_key(value: Any) -> tuple:
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


def write_outputs(rows: list[dict[str, Any]], study: Study, out_dir: Path, command: str) -> list[Path]:
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
        from .plot import plot_final_loss  # matplotlib only when there is a picture to draw

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
