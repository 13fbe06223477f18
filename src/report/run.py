"""A run read back from its files: the TensorBoard scalars, ``config.yaml`` and ``stall_events.json``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.callbacks.events import StallEvent, load_events
from src.names import EVENTS_FILE, GRAD_NORM, GRAD_NORM_FIRST_TO_LAST, GRAD_NORM_TOTAL

LAYER_TAG = re.compile(rf"^{re.escape(GRAD_NORM)}(.+)$")
NOT_LAYERS = {GRAD_NORM_TOTAL.removeprefix(GRAD_NORM), GRAD_NORM_FIRST_TO_LAST.removeprefix(GRAD_NORM)}


def _natural(name: str) -> list:
    """``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class RunError(ValueError):
    """RUN_DIR cannot be read as a run; the message says why and what to give instead."""


@dataclass
class Run:
    """What a run left on disk: scalars by tag as (steps, values), the config and the stall events."""

    path: Path
    scalars: dict[str, tuple[list[int], list[float]]]
    config: dict[str, Any] = field(default_factory=dict)
    events: list[StallEvent] = field(default_factory=list)

    def last(self, tag: str) -> float | None:
        return self.scalars[tag][1][-1] if tag in self.scalars and self.scalars[tag][1] else None

    def layer_names(self) -> list[str]:
        """Per-layer gradient-norm tags in layer order (``layers.0, layers.1, ...``; parameters excluded)."""
        names = [m.group(1) for tag in self.scalars if (m := LAYER_TAG.match(tag))]
        layers = [n for n in names if n not in NOT_LAYERS and not n.endswith((".weight", ".bias"))]
        return sorted(layers, key=_natural)

    def per_layer(self, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
        """Each layer's series under ``prefix`` (``saturated/``...), in layer order."""
        found = {tag.removeprefix(prefix): series for tag, series in self.scalars.items() if tag.startswith(prefix)}
        found = {name: series for name, series in found.items() if "/" not in name and name != "reference"}
        return dict(sorted(found.items(), key=lambda kv: _natural(kv[0])))

    def grad_matrix(self) -> tuple[list[str], list[int], list[list[float]]]:
        """Layers, the steps at which every layer was logged, and norms[layer][step]."""
        layers = self.layer_names()
        if not layers:
            return [], [], []
        common = set(self.scalars[f"{GRAD_NORM}{layers[0]}"][0])
        for name in layers[1:]:
            common &= set(self.scalars[f"{GRAD_NORM}{name}"][0])
        steps = sorted(common)
        rows = []
        for name in layers:
            by_step = dict(zip(*self.scalars[f"{GRAD_NORM}{name}"], strict=True))
            rows.append([by_step[s] for s in steps])
        return layers, steps, rows


def find_run(path: str | Path) -> Path:
    """``path`` itself when it holds event files, else the newest ``version_*`` below it that does."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such folder; give a run directory such as lightning_logs/version_0")
    if not path.is_dir():
        raise RunError(f"{path}: not a folder; give a run directory such as lightning_logs/version_0")
    if list(path.glob("events.out.tfevents.*")):
        return path
    runs = [*path.glob("version_*/events.out.tfevents.*"), *path.glob("lightning_logs/version_*/events.out.tfevents.*")]
    if not runs:
        raise RunError(
            f"{path}: not a run directory (no events.out.tfevents.* in it, nor in version_*/ below it); "
            "give lightning_logs/version_N of a run that has started"
        )
    return max((p.parent for p in runs), key=lambda d: max(f.stat().st_mtime for f in d.glob("events.out.*")))


def load_run(path: str | Path) -> Run:
    """Read a run directory (or the newest run below ``path``) without TensorFlow or re-training."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = find_run(path)
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    try:
        accumulator.Reload()
    except Exception as err:  # a torn or foreign file
        raise RunError(f"{run_dir}: the event files cannot be read ({err})") from None
    scalars: dict[str, tuple[list[int], list[float]]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        points = sorted((e.step, e.value) for e in accumulator.Scalars(tag))
        # a resumed run may log a step twice: keep the newest value of each step
        by_step = dict(points)
        scalars[tag] = (list(by_step), list(by_step.values()))
    if not scalars:
        raise RunError(f"{run_dir}: no scalars logged yet; wait for the first logged step, or check the run's output")
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    events: list[StallEvent] = []
    if (run_dir / EVENTS_FILE).is_file():
        try:
            events = load_events(run_dir / EVENTS_FILE)
        except ValueError as err:
            raise RunError(str(err)) from None
    return Run(run_dir, scalars, config, events)
