"""Every file under configs/ loads: experiment configs alone, trainer presets stacked on the default, the study."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from src.study import grid, load_study, run_args
from tests.conftest import REPO

CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(CONFIGS.glob("*.yaml"))
PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
STUDIES = sorted((CONFIGS / "study").glob("*.yaml"))


def test_every_config_file_is_covered_here():
    assert set(CONFIGS.rglob("*.yaml")) == {*EXPERIMENTS, *PRESETS, *STUDIES}


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


def stacked(first: dict, second: dict | None) -> dict:
    """``second`` over ``first`` as a later ``--config`` is: mappings merge, other values (lists) replace."""
    merged = dict(first)
    for key, value in (second or {}).items():
        merged[key] = stacked(first[key], value) if isinstance(value, dict) and key in first else value
    return merged


@pytest.mark.parametrize("study_file", STUDIES, ids=lambda p: p.name)
def test_study_file_resolves_for_every_policy(main, study_file: Path):
    study = load_study(study_file)
    for policy, fragment in study["policies"].items():
        point = next(p for p in grid(study) if p["policy"] == policy)
        result = main("fit", *run_args(study, point, "out"), "--print_config")
        assert result.returncode == 0, result.stderr[-2000:]
        printed = yaml.safe_load(result.stdout)
        assert_printed_has(printed, stacked(study["config"], fragment), f"{policy}: ")
        assert printed["model"]["depth"] == point["depth"]


def test_the_default_config_spells_out_the_default_escape_policy():
    """configs/default.yaml shows a learner the policy ``PlateauEscape()`` uses: the two stay the same."""
    from src.callbacks import PlateauEscape

    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    escape = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PlateauEscape"))
    written, default = PlateauEscape(**escape["init_args"]), PlateauEscape()
    assert written.actions == default.actions
