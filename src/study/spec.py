"""A study file, read and checked once: its axes, the options each grid point's run gets.

No torch or Lightning import, except in :func:`check_options`, which parses every option with the
CLI's own parser (see the study's README for the file's keys).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.errors import one_line

REPO = Path(__file__).resolve().parents[2]
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


@dataclass(frozen=True)
class Study:
    """A checked study file (see :func:`load_study`); a summary read back without its file needs only
    ``solved_below`` (and the rest at their defaults)."""

    path: str = ""
    axes: tuple[Axis, ...] = ()
    base_config: str = str(REPO / "configs" / "default.yaml")
    out_dir: str = "studies/study"
    config: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    test: bool = False
    metrics: tuple[str, ...] = ()
    count_below: dict[str, float] = field(default_factory=dict)
    stalled_above: float | None = 0.5
    solved_below: float | None = 0.05
    stop_below: float | None = None


def load_study(path: str | Path, base_config: str | None = None) -> Study:
    """Read and check a study file; ``base_config`` replaces the file's (``--base-config``)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file (see configs/study/vanishing.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file is a mapping of keys ({', '.join(sorted(KEYS))})")
    unknown = set(raw) - KEYS
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {sorted(unknown)}; a study takes {', '.join(sorted(KEYS))}")
    axes = _axes(raw, path)
    given = Path(base_config or raw.get("base_config") or REPO / "configs" / "default.yaml")
    base = (given if given.is_absolute() or given.is_file() else REPO / given).resolve()
    if not base.is_file():
        raise StudyError(f"{path}: base_config {given} does not exist")
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise StudyError(f"{path}: 'config' must be a mapping of config sections, like a config file's")
    args = raw.get("args", [])
    if not isinstance(args, list):
        raise StudyError(f"{path}: 'args' must be a list of CLI options, e.g. [--trainer.max_epochs=300]")
    if not isinstance(raw.get("test", False), bool):
        raise StudyError(f"{path}: 'test' must be true or false")
    metrics = raw.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise StudyError(f"{path}: 'metrics' must be a list of metric names, e.g. [test/acc]")
    count_below = raw.get("count_below", {})
    if not isinstance(count_below, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in count_below.items()
    ):
        raise StudyError(f"{path}: 'count_below' must map a metric name to a number, e.g. {{val/prob_mae: 0.03}}")
    limits = {}
    for key, default in (("stalled_above", 0.5), ("solved_below", 0.05)):
        value = limits[key] = raw.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise StudyError(f"{path}: '{key}' must be a positive loss or null (no such column), got {value!r}")
    stop = raw.get("stop_below")
    bound, name = min(((v, k) for k, v in limits.items() if v is not None), default=(float("inf"), "inf"))
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0 < stop <= bound):
        raise StudyError(f"{path}: 'stop_below' must be a loss in (0, {name} = {bound}] or null, got {stop!r}")
    return Study(
        path=str(path), axes=tuple(axes), base_config=str(base), out_dir=raw.get("out_dir", f"studies/{path.stem}"),
        config=config, args=tuple(args), test=raw.get("test", False),
        metrics=tuple(dict.fromkeys([*metrics, *count_below])),  # a counted metric is reported too
        count_below=count_below, stop_below=stop, **limits,
    )  # fmt: skip


def grid(study: Study) -> list[dict[str, Any]]:
    """Every point of the grid: ``{column: label}`` for each axis, in axis order (seeds vary fastest)."""
    axes = study.axes
    return [dict(zip((a.column for a in axes), labels, strict=True))
            for labels in itertools.product(*(list(a.values) for a in axes))]  # fmt: skip


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text)


def run_name(point: dict[str, Any], study: Study | None = None) -> str:
    """A folder name for the point: ``sigmoid_d07_s0``, ``he_dropout-0.3``, ``xavier_s2_default``..."""
    axes = study.axes if study else [Axis(c, "", {}) for c in point]
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


def stacked(config: dict[str, Any], fragment: dict[str, Any] | None) -> dict[str, Any]:
    """``fragment`` (a policy) stacked on ``config``, as a second ``--config`` would be, except that its
    ``trainer.callbacks`` are added to ``config``'s instead of replacing them: a study file names each
    callback once.

    >>> base = {"trainer": {"max_epochs": 5, "callbacks": [{"class_path": "A"}]}}
    >>> stacked(base, {"trainer": {"callbacks": [{"class_path": "B"}]}})["trainer"]
    {'max_epochs': 5, 'callbacks': [{'class_path': 'A'}, {'class_path': 'B'}]}
    """
    merged = copy.deepcopy(config)
    for section, values in (fragment or {}).items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            for key, value in values.items():
                if (section, key) == ("trainer", "callbacks") and isinstance(merged[section].get(key), list):
                    merged[section][key] = [*merged[section][key], *value]
                else:
                    merged[section][key] = value
        else:
            merged[section] = values
    return merged


def run_args(study: Study, point: dict[str, Any], out_dir: str, axes: tuple[Axis, ...] | None = None) -> list[str]:
    """The CLI options of one grid point's run (what ``python -m src.train fit`` would be given); with
    ``axes``, only those axes' options (``point`` then needs only their columns)."""
    axes = study.axes if axes is None else axes
    name = run_name(point, study) if axes is study.axes else "check"
    config = study.config
    for axis in axes:
        if axis.kind == "config":
            config = stacked(config, axis.values[point[axis.column]])
    options = [a for a in axes if a.kind != "config"]
    return [
        "--config", study.base_config, *(["--config", yaml.safe_dump(config)] if config else []),
        *study.args,
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


def check_options(study: Study) -> None:
    """Parse the study's options with the CLI's own parser, building nothing: first the shared settings
    (``config``, ``args``), then each value of each axis on its own, so that a bad option name or value
    fails in one line naming the axis and the value, before any run starts."""
    from src.cli import quiet_expected_warnings

    quiet_expected_warnings()
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0" of each parse
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")  # the study's own argv
    where, checker = study.path, _checker()
    failures = (checker["rejected"], ValueError, TypeError)
    try:
        if "parser" not in checker:
            base = ["--config", study.base_config]
            checker["parser"] = checker["cli"](args=base, run=False, parser_class=checker["parser_class"]).parser
        parser = checker["parser"]
        parser.parse_args(run_args(study, {}, "check", axes=()))
    except failures as err:
        raise StudyError(f"{where}: base_config, config or args: {one_line(err)}") from None
    for axis in study.axes:
        for label in axis.values:
            try:
                parser.parse_args(run_args(study, {axis.column: label}, "check", axes=(axis,)))
            except failures as err:
                raise StudyError(f"{where}: {axis.describe(label)}: {one_line(err)}") from None
