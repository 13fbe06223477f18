"""The stall event: one typed record, its JSON form, and the one "out of the stall" rule."""

from __future__ import annotations

import json
import math

import pytest

from src.callbacks.events import Action, EventKind, StallEvent, load_events, moved_past, out_of_stall, save_events

# A stall_events.json as the template wrote it before the event had a type (2026-11-24).
OLD_FILE = [
    {"kind": "stall", "epoch": 99, "step": 99, "monitor": "train/loss", "value": 0.6931,
     "actions": [{"action": "momentum 0.9", "epoch": 99, "step": 99, "lr": [0.1], "momentum": [0.9]}],
     "diagnosis": "flat", "first_to_last": 0.5, "grad_norms": {"layers.0": 1e-5, "layers.1": 2e-5}},
    {"kind": "divergence", "epoch": 300, "step": 300, "monitor": "train/loss", "value": "nan",
     "actions": [{"action": "stop: every escape action is spent"}], "recovered": True},
]  # fmt: skip


def test_an_event_file_written_before_the_type_still_loads(tmp_path):
    path = tmp_path / "stall_events.json"
    path.write_text(json.dumps(OLD_FILE))
    stall, divergence = load_events(path)
    assert stall.kind is EventKind.STALL and stall.diagnosis == "flat" and stall.grad_norms["layers.1"] == 2e-5
    assert stall.actions == [Action("momentum 0.9", 99, 99, lr=[0.1], momentum=[0.9])]
    assert divergence.kind is EventKind.DIVERGENCE and math.isnan(divergence.value) and divergence.recovered
    assert divergence.actions[0].epoch is None


def test_saving_and_loading_gives_the_same_events_and_a_readable_file(tmp_path):
    path = tmp_path / "run" / "stall_events.json"
    events = [StallEvent.from_dict(item) for item in OLD_FILE]
    events[0].actions.append(Action("lr x5", 120, 120, lr=[0.5], momentum=[0.9], lr_from=[0.1], lr_raise=True))
    save_events(events, path)
    again = load_events(path)
    assert again[0] == events[0] and again[1].to_dict() == events[1].to_dict()
    written = json.loads(path.read_text())
    assert written[1]["value"] == "nan" and "diagnosis" not in written[1]  # no nulls for what it does not have
    assert written[0]["actions"][1] == {"action": "lr x5", "epoch": 120, "step": 120, "lr": [0.5],
                                        "momentum": [0.9], "lr_from": [0.1], "lr_raise": True}  # fmt: skip
    assert not list(path.parent.glob("*.tmp"))


def test_a_file_that_is_not_an_event_list_is_named(tmp_path):
    path = tmp_path / "stall_events.json"
    path.write_text('{"kind": "stall"}')
    with pytest.raises(ValueError, match="stall_events.json: not a stall events file"):
        load_events(path)


@pytest.mark.parametrize(
    ("value", "fraction", "mode", "out"),
    [(0.35, 0.5, "min", False), (0.34, 0.5, "min", True), (0.3, 0.2, "min", False), (0.13, 0.2, "min", True),
     (1.3, 0.5, "max", False), (1.4, 0.5, "max", True), (math.nan, 0.5, "min", False), (math.inf, 0.5, "max", False)],
)  # fmt: skip
def test_out_of_the_stall_is_one_rule_with_the_fraction_the_event_carries(value, fraction, mode, out):
    event = StallEvent(EventKind.STALL, 1, 1, "m", 0.69, out_fraction=fraction)
    assert moved_past(value, 0.69, fraction, mode) is out
    assert out_of_stall(value, event, mode) is out
