"""The stall event: what :class:`~.plateau.PlateauDetector` saw and what :class:`~.escape.PlateauEscape` did.

One record, written by the detector, added to by the escape, read by the progress bar, the summary,
the dashboard, the report and the study. Its JSON form (``stall_events.json`` in the run directory)
is read and written here only. No torch or Lightning import: a finished run's events load without either.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

# How far a monitored value must move from its stalled value for the run to be out of the stall,
# when nothing else was said: to half the loss (twice the metric, with ``mode: max``).
OUT_OF_STALL = 0.5


class EventKind(str, Enum):
    """What happened: the metric stopped improving, or it became NaN, infinite or worse than a threshold."""

    STALL = "stall"
    DIVERGENCE = "divergence"


@dataclass
class Action:
    """One thing done about an event (an escape action, its undoing, a rollback), and the settings it left.

    ``lr`` and ``momentum`` hold one value per param group of the first optimizer, as the next
    optimizer step will use them; ``lr_from`` the lrs just before the action, where it changed them.
    """

    action: str
    epoch: int | None = None
    step: int | None = None
    lr: list[float] | None = None
    momentum: list[float] | None = None
    lr_from: list[float] | None = None
    lr_raise: bool = False  # an lr raise: what a later divergence is blamed on


@dataclass
class StallEvent:
    """A stall or a divergence at a check of the monitored metric.

    ``value`` may be NaN or infinite (a divergence); JSON holds those as the strings ``"nan"``, ``"inf"``.
    A stall also has its ``diagnosis`` and the per-layer gradient norms it was made from (the latest
    profile of the window: ``grad_norms`` and ``first_to_last``), and ``units``, the idle ReLU units
    found (per layer: ``dead``, ``always_on``, ``redundant``), and ``layers``, what each layer did at
    the last recorded step (:class:`~.layer_stats.LayerStats`: ``saturated``, ``dead``, ``act_mean``,
    ``act_std``, ``update_ratio``, ``grad_to_weight``). ``out_fraction`` is how far the value
    must fall (rise, with ``mode: max``) for the run to be out of this stall (see :func:`out_of_stall`);
    ``recovered`` marks a divergence that a rollback undid.

    >>> event = StallEvent(EventKind.STALL, epoch=3, step=3, monitor="train/loss", value=0.69)
    >>> StallEvent.from_dict(event.to_dict()) == event, event.to_dict()["kind"]
    (True, 'stall')
    """

    kind: EventKind
    epoch: int
    step: int
    monitor: str
    value: float
    actions: list[Action] = field(default_factory=list)
    diagnosis: str | None = None
    first_to_last: float | None = None
    grad_norms: dict[str, float] | None = None
    units: dict[str, dict[str, list]] | None = None
    layers: dict[str, dict[str, float]] | None = None
    out_fraction: float = OUT_OF_STALL
    recovered: bool = False

    @property
    def is_stall(self) -> bool:
        return self.kind is EventKind.STALL

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; fields at their default are left out, so the file stays short."""
        data: dict[str, Any] = {"kind": self.kind.value, "epoch": self.epoch, "step": self.step,
                                "monitor": self.monitor, "value": _number(self.value)}  # fmt: skip
        data["actions"] = [_compact(asdict(a), Action) for a in self.actions]
        for name in ("diagnosis", "first_to_last", "grad_norms", "units", "layers"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.out_fraction != OUT_OF_STALL:
            data["out_fraction"] = self.out_fraction
        if self.recovered:
            data["recovered"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StallEvent:
        """An event from :meth:`to_dict`'s data, or from a ``stall_events.json`` of an earlier version."""
        known = {f.name for f in fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in known}
        kwargs["kind"] = EventKind(data["kind"])
        kwargs["value"] = float(data["value"])  # "nan" and "inf" included
        kwargs["actions"] = [Action(**{k: v for k, v in a.items() if k in _ACTION_FIELDS}) for a in data["actions"]]
        return cls(**kwargs)


_ACTION_FIELDS = {f.name for f in fields(Action)}


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _compact(data: dict[str, Any], kind: type) -> dict[str, Any]:
    defaults = {f.name: f.default for f in fields(kind)}
    return {key: value for key, value in data.items() if value != defaults[key] or key == "action"}


def out_of_stall(value: float, event: StallEvent, mode: str = "min") -> bool:
    """Whether ``value`` says the run is out of ``event``'s stall: the one rule that the escape (to undo
    its kicks) and the progress bar (to close the stall) use. See :func:`moved_past`.

    >>> stall = StallEvent(EventKind.STALL, 0, 0, "train/loss", 0.69)
    >>> out_of_stall(0.5, stall), out_of_stall(0.3, stall), out_of_stall(float("nan"), stall)
    (False, True, False)
    """
    return moved_past(value, event.value, event.out_fraction, mode)


def moved_past(value: float, at: float, fraction: float = OUT_OF_STALL, mode: str = "min") -> bool:
    """Whether ``value`` has fallen below ``fraction`` of ``at`` (risen above ``at / fraction`` with
    ``mode: max``); a NaN or infinite value never has.

    >>> moved_past(0.3, 0.69), moved_past(0.3, 0.69, fraction=0.2), moved_past(0.9, 0.4, mode="max")
    (True, False, True)
    """
    if not math.isfinite(value):
        return False
    return value >= at / fraction if mode == "max" else value <= at * fraction


def save_events(events: list[StallEvent], path: str | Path) -> None:
    """Write ``events`` to ``path`` as JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps([event.to_dict() for event in events], indent=2))
    os.replace(tmp, path)


def load_events(path: str | Path) -> list[StallEvent]:
    """The events of a ``stall_events.json``.

    Raises:
        ValueError: If the file is not such a list, naming the file.
    """
    try:
        return [StallEvent.from_dict(item) for item in json.loads(Path(path).read_text())]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a stall events file ({err})") from None
