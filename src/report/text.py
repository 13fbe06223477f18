"""A run as a table: config essentials, final metrics, stall events with their diagnosis and actions."""

from __future__ import annotations

import math
from typing import Any

from src.callbacks.plateau_rule import describe_units
from src.names import GRAD_NORM_FIRST_TO_LAST, METRICS

from .run import Run


def _class_name(section: Any) -> str:
    if isinstance(section, dict) and "class_path" in section:
        args = section.get("init_args") or {}
        # the values a user sets; the optimizers' many defaults (False, 0.0) would drown them
        inner = ", ".join(f"{k}={v}" for k, v in args.items() if v not in (None, False, 0.0) or k == "momentum")
        return f"{section['class_path'].rsplit('.', 1)[-1]}({inner})"
    return str(section)


def summary(run: Run) -> str:
    """The run as a table: config essentials, final metrics, stall events with diagnosis and actions."""
    model = run.config.get("model") or {}
    rows = [("run", str(run.path))]
    if model:
        keys = ("depth", "width", "activation", "init", "dropout", "batch_norm")
        rows.append(("model", ", ".join(f"{k} {model[k]}" for k in keys if k in model)))
    for key in ("optimizer", "data"):
        if key in run.config:
            rows.append((key, _class_name(run.config[key])))
    for tag in METRICS:
        value = run.last(tag)
        if value is not None:
            steps = run.scalars[tag][0]
            rows.append((tag, f"{value:.4g} (step {steps[-1]})"))
    ratio = run.scalars.get(GRAD_NORM_FIRST_TO_LAST)
    if ratio:
        rows.append(
            ("first/last grad", f"{ratio[1][0]:.2g} at step {ratio[0][0]} -> {ratio[1][-1]:.2g} at {ratio[0][-1]}")
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append(f"{'events':<{width}}  {len(run.events) or 'none'}")
    for event in run.events:
        what = event.kind.value + (f" ({event.diagnosis})" if event.diagnosis else "")
        value = f"{event.value:.4g}" if math.isfinite(event.value) else str(event.value)
        actions = "; ".join(a.action for a in event.actions) or "-"
        units = f"  [{describe_units(event.units)}]" if event.units else ""
        lines.append(
            f"  epoch {event.epoch:>5}  step {event.step:>6}  {what:<18} {event.monitor} {value}  {actions}" + units
        )
    return "\n".join(lines)
