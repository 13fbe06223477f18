"""Every file under configs/ loads: experiment configs alone, trainer presets stacked on the default, the study."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from src.study import check_options, grid, load_study, run_args, stacked
from tests.helpers import REPO

CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(CONFIGS.glob("*.yaml"))
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
STUDIES = sorted((CONFIGS / "study").glob("*.yaml"))


@pytest.mark.parametrize("config", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_says_what_it_is_for_and_is_checked_here(config: Path):
    header = [line for line in config.read_text().splitlines()[:3] if line.startswith("# ")]
    assert len(header) >= 2, f"{config}: start with a comment of what it demonstrates (and what to expect)"
    assert config in {*EXPERIMENTS, *PRESETS, *STUDIES}, f"{config}: a folder the tests below do not read"


def assert_printed_has(printed: dict, written: dict, where: str = "") -> None:
    """Every plain value the file sets is in the resolved config (class_path sections: their init_args)."""
    for key, value in written.items():
        if key == "callbacks":
            names = [c["class_path"] for c in printed[key]]
            assert names == [c["class_path"] for c in value], where + key
        elif isinstance(value, dict):
            assert_printed_has(printed[key], value, f"{where}{key}.")
        else:
            assert printed[key] == value, where + key


@pytest.mark.parametrize("config", EXPERIMENTS + PRESETS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_resolves_to_what_it_says(main, config: Path):
    stack = ["--config", str(CONFIGS / "default.yaml")] if config in PRESETS else []
    result = main("fit", *stack, "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_printed_has(yaml.safe_load(result.stdout), yaml.safe_load(config.read_text()))


def option(printed: dict, name: str):
    """``printed["model"]["init"]`` for ``model.init``."""
    for part in name.split("."):
        printed = printed[part]
    return printed


@pytest.mark.parametrize("study_file", STUDIES, ids=lambda p: p.name)
def test_study_file_resolves_for_every_axis_value(main, study_file: Path):
    study = load_study(study_file)
    check_options(study)  # every value of every axis parses, as python -m src.study checks before it runs
    points = grid(study)
    policies = next((axis for axis in study.axes if axis.kind == "config"), None)
    checks = [points[0], {axis.column: list(axis.values)[-1] for axis in study.axes}]
    checks += [{**points[0], policies.column: label} for label in policies.values] if policies else []
    checks = [dict(items) for items in dict.fromkeys(tuple(point.items()) for point in checks)]  # once each
    for point in checks:  # the resolved config of a run carries its point's settings
        result = main("fit", *run_args(study, point, "out"), "--print_config")
        assert result.returncode == 0, result.stderr[-2000:]
        printed = yaml.safe_load(result.stdout)
        fragment = policies.values[point[policies.column]] if policies else None
        assert_printed_has(printed, stacked(study.config, fragment), f"{point}: ")
        for axis in study.axes:
            payload = axis.values[point[axis.column]]
            if axis.kind == "option":
                assert option(printed, axis.option) == payload, (point, axis.option)
            elif axis.kind == "options":
                assert all(option(printed, name) == value for name, value in payload.items()), (point, payload)
            elif axis.kind == "optimizer" and payload is not None:
                assert printed["optimizer"]["class_path"] == payload["class_path"]
