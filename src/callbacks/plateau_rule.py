"""When has a run stalled, and why: the decision rule and the diagnosis, apart from Lightning.

:class:`PlateauTracker` decides from the monitored values, :func:`diagnose` reads the per-layer
gradient norms seen while the stall built up. :class:`~.plateau.PlateauDetector` wires both to
Lightning's hooks; :class:`StallReporter` is what other code may rely on from such a detector.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch-free at run time: the report reads events without importing torch
    from .events import StallEvent
    from .grad_flow import GradProfile

Diagnosis = Literal[
    "saturated_units", "vanishing", "dead_units", "always_on_units", "redundant_units", "flat", "unclear"
]
DIAGNOSES: tuple[str, ...] = (
    "saturated_units", "vanishing", "dead_units", "always_on_units", "redundant_units", "flat", "unclear"
)  # fmt: skip
# A layer with at least this share of its outputs at a bound of its activation is pinned there.
SATURATED_SHARE = 0.9
# which list of :func:`~.units.idle_units` each unit diagnosis reads
UNIT_DIAGNOSES = {"dead_units": "dead", "always_on_units": "always_on", "redundant_units": "redundant"}


@runtime_checkable
class StallReporter(Protocol):
    """What a callback that reports stalls offers to the rest of a run (summary, dashboard, checkpoint).

    ``events`` lists every stall and divergence of the fit so far, as recorded in ``stall_events.json``;
    ``diverged`` is true once one of them is a divergence that no rollback undid; ``mode`` says
    whether lower (``min``) or higher (``max``) values of the monitored metric are better.
    """

    events: list[StallEvent]
    mode: str

    @property
    def diverged(self) -> bool: ...


class Status(Enum):
    """What one check of the monitored metric concluded."""

    WARMUP = "warmup"
    IMPROVED = "improved"
    WAITING = "waiting"
    COOLDOWN = "cooldown"
    PLATEAU = "plateau"
    DIVERGED = "diverged"


class PlateauTracker:
    """The decision rule, apart from Lightning: has the metric stopped improving?

    A value improves on the best so far when it beats it by more than ``min_delta``, relative to
    the best (``threshold_mode="rel"``) or absolute (``"abs"``), as in ``ReduceLROnPlateau``.
    After ``warmup`` checks, ``patience`` checks in a row without improvement make a plateau; then
    the counter restarts, and ``cooldown`` checks pass before waiting starts again. A value that is
    NaN or infinite, or worse than ``divergence_threshold``, is a divergence, never a plateau.

    >>> tracker = PlateauTracker(patience=2)
    >>> [tracker.update(v).value for v in (0.9, 0.7, 0.7, 0.7, float("nan"))]
    ['improved', 'improved', 'waiting', 'plateau', 'diverged']
    """

    mode_dict = {"min": -1.0, "max": 1.0}

    def __init__(
        self,
        mode: str = "min",
        patience: int = 100,
        min_delta: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        warmup: int = 0,
        divergence_threshold: float | None = None,
    ) -> None:
        if mode not in self.mode_dict:
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        for name, value in (("patience", patience), ("cooldown", cooldown), ("warmup", warmup)):
            if value < (1 if name == "patience" else 0):
                raise ValueError(f"{name} must be >= {1 if name == 'patience' else 0}, got {value}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.threshold_mode, self.cooldown, self.warmup = threshold_mode, cooldown, warmup
        self.divergence_threshold = divergence_threshold
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_left = 0
        self.checks = 0

    def improves(self, value: float) -> bool:
        sign = self.mode_dict[self.mode]
        if math.isinf(self.best):
            return True
        margin = self.min_delta * abs(self.best) if self.threshold_mode == "rel" else self.min_delta
        return sign * (value - self.best) > margin

    def diverged(self, value: float) -> bool:
        if self.divergence_threshold is None:
            return False
        return value > self.divergence_threshold if self.mode == "min" else value < self.divergence_threshold

    def update(self, value: float) -> Status:
        self.checks += 1
        if not math.isfinite(value) or self.diverged(value):
            return Status.DIVERGED
        improved = self.improves(value)
        if improved:
            self.best = value
        if self.checks <= self.warmup:
            return Status.WARMUP
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
            return Status.IMPROVED if improved else Status.COOLDOWN
        if improved:
            self.wait = 0
            return Status.IMPROVED
        self.wait += 1
        if self.wait < self.patience:
            return Status.WAITING
        self.wait = 0
        self.cooldown_left = self.cooldown
        return Status.PLATEAU

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_left": self.cooldown_left, "checks": self.checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]
        self.cooldown_left, self.checks = state["cooldown_left"], state["checks"]


def diagnose(
    profiles: Sequence[GradProfile],
    vanishing_ratio: float = 1e-3,
    flat_norm: float = 1e-3,
    flat_spread: float = 100.0,
    units: Mapping[str, Mapping[str, list]] | None = None,
    layers: Mapping[str, Any] | None = None,
    pinned_everywhere: bool = True,
) -> Diagnosis:
    """Why a stall happened, from the per-layer gradient norms seen while it built up, and the
    ReLU units that did nothing over the last epoch (``units``: per layer, the lists of
    :func:`~.units.idle_units`), and what each layer's activations did (``layers``: per layer, a
    :class:`~.layer_stats.LayerStats`, whose ``saturated`` share is read).

    Each weight layer's norms are summarised by the median over ``profiles`` of their log (ignoring exact zeros). Then:

    - ``saturated_units``: some layer's gradient was exactly 0 throughout and some layer of a bounded
      activation (sigmoid, tanh...) has at least ``SATURATED_SHARE`` (0.9) of its outputs at a bound:
      the units are pinned where the activation's derivative is 0 (a float32 sigmoid beyond |z| ~17
      is exactly 0 or 1), so no step on the gradient can move them: not ``vanishing``, whose
      gradients are small but not 0 and whose units are alive.

    - ``vanishing``: the first layer's gradient is below ``vanishing_ratio`` times the last's, in a
      net of three weight layers or more: the early layers cannot learn (a deep sigmoid net:
      first/last 1e-7 and lower).
    - ``dead_units``, ``always_on_units``, ``redundant_units`` (in that order; before ``vanishing``
      when some layer's gradient was exactly 0 throughout, as below a layer of dead units): some layer has a
      ReLU unit that is zero on every sample, one that is active on every sample (its kink lies
      outside the data: no nonlinearity), or two units with one kink. A net of few units settles
      in such a minimum and no optimizer setting gets it out (the dnnex fit).
    - ``flat``: every layer's gradient is below ``flat_norm`` and the largest is within
      ``flat_spread`` times the smallest: an even, tiny profile, so the loss itself is flat there
      (a saddle, plateau or local minimum).
    - ``saturated_units`` again, last: none of the above, and some unit of a bounded activation is
      pinned at a bound on nearly every sample (``units``' ``saturated`` lists, from
      :class:`~.saturated.PinnedUnits`), and on every one (``pinned_everywhere``): a unit at 1 on
      every input is a bias. Units pinned on 90% of the inputs of a net that learns are not a
      diagnosis: in a Fashion-MNIST sigmoid net at 82% they were first-layer units that answer to
      few images, and re-placing them took it to 45%.
    - ``unclear``: neither, or no gradients were seen.

    >>> from src.callbacks.grad_flow import GradProfile
    >>> deep = GradProfile(0, ("a", "b", "c"), (1e-9, 1e-5, 1e-2), (True, True, True))
    >>> even = GradProfile(0, ("a", "b", "c"), (2e-5, 1e-5, 3e-5), (True, True, True))
    >>> diagnose([deep]), diagnose([even]), diagnose([])
    ('vanishing', 'flat', 'unclear')
    >>> diagnose([even], units={"layers.0": {"dead": [], "always_on": [1], "redundant": []}})
    'always_on_units'
    >>> from src.callbacks.layer_stats import LayerStats
    >>> pinned = GradProfile(0, ("a", "b", "c"), (0.0, 0.0, 1e-2), (True, True, True))
    >>> diagnose([pinned], layers={"a": LayerStats(1.0, 0.0, saturated=1.0)}), diagnose([pinned])
    ('saturated_units', 'vanishing')
    >>> lab = GradProfile(0, ("a", "b"), (0.02, 0.03), (True, True))  # XOR 2-2-1 at its local minimum
    >>> diagnose([lab]), diagnose([lab], units={"a": {"saturated": [1]}})
    ('unclear', 'saturated_units')
    """
    unit_diagnosis = next(
        (d for d, key in UNIT_DIAGNOSES.items() if any(found.get(key) for found in (units or {}).values())), None
    )
    if not profiles:
        return unit_diagnosis or "unclear"
    columns = [i for i, w in enumerate(profiles[-1].weight_layers) if w] or list(range(len(profiles[-1].norms)))
    # The median of log10 norms over the steps where the layer's gradient was not exactly 0: a step
    # whose gradient underflows to 0 in float32 must not decide the diagnosis.
    log_norm = [
        statistics.median([math.log10(p.norms[i]) for p in profiles if p.norms[i] > 0] or [-38.0]) for i in columns
    ]
    # A layer whose gradient is exactly 0 throughout sits below a dead or saturated layer: units, not vanishing.
    blocked = any(all(p.norms[i] == 0 for p in profiles) for i in columns)
    pinned = any((getattr(s, "saturated", None) or 0.0) >= SATURATED_SHARE for s in (layers or {}).values())
    if blocked and pinned:
        return "saturated_units"
    if unit_diagnosis and blocked:
        return unit_diagnosis
    # Gradients vanish through depth: with two weight layers a small first/last ratio is something else.
    if len(log_norm) >= 3 and log_norm[0] - log_norm[-1] < math.log10(vanishing_ratio):
        return "vanishing"
    if unit_diagnosis:
        return unit_diagnosis
    if max(log_norm) < math.log10(flat_norm) and max(log_norm) - min(log_norm) < math.log10(flat_spread):
        return "flat"
    if pinned_everywhere and any(found.get("saturated") for found in (units or {}).values()):
        return "saturated_units"
    return "unclear"


def describe_event(event: StallEvent) -> str:
    """One line of text for an event, as shown in TensorBoard and the end-of-run summary."""
    text = f"epoch {event.epoch} (step {event.step}): {event.kind.value}"
    if event.diagnosis:
        text += f", diagnosis {event.diagnosis}"
    if math.isfinite(event.value):
        text += f", {event.monitor} = {event.value:.4g}"
    if event.first_to_last is not None:
        text += f", first/last grad {event.first_to_last:.1e}"
    if event.units:
        text += f", units {describe_units(event.units)}"
    for action in event.actions:
        text += f"; action: {action.action}"
    return text


def describe_units(units: Mapping[str, Mapping[str, list]]) -> str:
    """The idle units of an event, short: ``net.layers.0 dead [1], always on [0]``.

    >>> describe_units({"net.layers.0": {"dead": [1], "always_on": [0], "redundant": []}})
    'net.layers.0 dead [1], always on [0]'
    """
    parts = []
    for layer, found in units.items():
        kinds = [f"{kind.replace('_', ' ')} {found[kind]}" for kind in ("dead", "always_on", "redundant", "saturated")
                 if found.get(kind)]  # fmt: skip
        parts.append(f"{layer} {', '.join(kinds)}")
    return "; ".join(parts)
