"""Run a study's grid points: each one a normal fit of the template's CLI, in worker processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from src.errors import one_line
from src.names import TRAIN_LOSS

from .spec import Study, run_args, run_name

RUN_LOG = "run.log"  # beside each run's TensorBoard folder: its warnings and Lightning's messages
RESULT = "result.json"  # a finished run's summary row: a re-run of the study skips that run
_CAPTURED = ("py.warnings", "lightning.pytorch", "lightning.fabric")


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Send the warnings and Lightning's messages of one run to its own log file instead of the study's
    console (where a line per run would break the progress bar), and restore the loggers after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in _CAPTURED]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    logging.captureWarnings(True)
    try:
        for lg in loggers:
            lg.handlers, lg.propagate = [handler], False
            lg.setLevel(logging.INFO)
        yield
    finally:
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        logging.captureWarnings(False)
        handler.close()


def prepare_run(study: Study, point: dict[str, Any], out_dir: str) -> tuple[Any, Any]:
    """One grid point's run as a worker builds it, not yet fitted: the ``TemplateCLI`` (its trainer,
    model and data module) and the callback that notes the first epoch below ``solved_below``."""
    import torch
    from lightning.pytorch.callbacks import EarlyStopping

    from src.cli import TemplateCLI, quiet_expected_warnings

    from .probes import FirstEpochBelow

    torch.set_num_threads(1)  # the workers share the cores
    quiet_expected_warnings()
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")  # the study's own argv
    cli = TemplateCLI(args=run_args(study, point, out_dir), run=False, save_config_kwargs={"overwrite": True})
    probe = FirstEpochBelow(TRAIN_LOSS, study.solved_below if study.solved_below is not None else -float("inf"))
    if study.solved_below is not None:
        cli.trainer.callbacks.append(probe)
    if study.stop_below is not None:  # converged: the rest of the run would not change its row's verdicts
        # check_finite off: a NaN is PlateauDetector's to judge (a divergence PlateauEscape rolls back, the run
        # goes on; without the escape the detector ends the run); EarlyStopping's default ended the fit there
        stop = EarlyStopping(
            TRAIN_LOSS, patience=sys.maxsize, stopping_threshold=study.stop_below, check_on_train_epoch_end=True,
            check_finite=False,
        )  # fmt: skip
        cli.trainer.callbacks.append(stop)
    return cli, probe


def run_point(study: Study, point: dict[str, Any], out_dir: str, threads: int = 1) -> dict[str, Any]:
    """One fit (and test, with ``test: true``), in a worker process or a Ray task; returns its row of
    the summary. What the run warns goes to ``runs/<name>/run.log``. A run that diverged is a row
    marked failed (with its loss); one stopped by a signal raises (it is not finished)."""
    import torch

    from src.callbacks import GracefulStop, PlateauDetector

    start = time.perf_counter()
    with run_log(Path(out_dir) / "runs" / run_name(point, study) / RUN_LOG):
        cli, probe = prepare_run(study, point, out_dir)
        torch.set_num_threads(threads)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        stop = next((cb for cb in cli.trainer.callbacks if isinstance(cb, GracefulStop)), None)
        if stop is not None and stop.stopped_by:
            raise RuntimeError(f"stopped by {stop.stopped_by} at epoch {cli.trainer.current_epoch}")
        final = float(cli.trainer.callback_metrics[TRAIN_LOSS])
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        epochs = cli.trainer.current_epoch
        if study.test:
            for result in cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in result.items()})
    detector = next((cb for cb in cli.trainer.callbacks if isinstance(cb, PlateauDetector)), None)
    stalls = [e for e in (detector.events if detector else []) if e.is_stall]
    row = {**point, "run": run_name(point, study), "final_loss": final}
    if study.stalled_above is not None:
        row["stalled"] = final > study.stalled_above
    if detector is not None:
        row["diagnosis"] = stalls[0].diagnosis if stalls else ""
        row["first_stall_epoch"] = stalls[0].epoch if stalls else ""
    if study.solved_below is not None:
        row[f"epoch_below_{study.solved_below}"] = probe.epoch if probe.epoch is not None else ""
    for name in study.metrics:
        row[name] = metrics.get(name, "")
    row |= {"epochs": epochs, "seconds": round(time.perf_counter() - start, 1), "log_dir": cli.trainer.log_dir}
    if detector is not None and detector.diverged:
        row |= {"status": "failed", "error": detector.stopping_reason_message or "diverged"}
    return row


def result_path(out_dir: Path, name: str) -> Path:
    """Where a finished run's row is kept: what a re-run of the study reads instead of running it again."""
    return Path(out_dir) / "runs" / name / RESULT


def finished_rows(study: Study, points: list[dict[str, Any]], out_dir: Path) -> dict[str, dict[str, Any]]:
    """The rows of the runs that finished in an earlier run of this study into ``out_dir``, by name
    (a run with no ``result.json``, or an unreadable one, is not finished)."""
    rows = {}
    for point in points:
        name = run_name(point, study)
        try:
            row = json.loads(result_path(out_dir, name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and row.get("run") == name:
            rows[name] = row
    return rows


def run_all(
    study: Study, points: list[dict[str, Any]], out_dir: Path, launcher: Any, threads: int = 1
) -> tuple[list[dict[str, Any]], bool]:
    """Every point on ``launcher`` (:mod:`.launchers`), with an overall bar on stderr and a line per
    finished run on stdout. A finished run's row goes to ``runs/<name>/result.json``; a run that
    fails (an error, a lost worker) is a row marked failed with its reason, and the others go on.
    Ctrl+C (or SIGTERM) cancels the runs not finished. Returns the rows and whether the study was
    interrupted."""
    start, rows, interrupted = time.perf_counter(), [], False
    by_name = {run_name(p, study): p for p in points}
    bar = tqdm(total=len(points), desc="study", unit="run", file=sys.stderr, dynamic_ncols=True)
    jobs = [(name, (study, point, str(out_dir), threads)) for name, point in by_name.items()]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop: as Ctrl+C, no orphaned workers
    try:
        with bar:
            for done, (name, result) in enumerate(launcher.run(run_point, jobs), start=1):
                bar.update(1)
                if isinstance(result, BaseException):
                    result = {**by_name[name], "run": name, "status": "failed", "error": one_line(result)}
                else:
                    _write_json(result_path(out_dir, name), result)
                rows.append(result)
                bar.write(f"[{done}/{len(points)}] {describe_row(result, study)} "
                          f"({time.perf_counter() - start:.0f} s elapsed)", file=sys.stdout)  # fmt: skip
                if "stalled" in result:
                    finished = [r for r in rows if "stalled" in r]
                    bar.set_postfix(learned=sum(not r["stalled"] for r in finished),
                                    stalled=sum(r["stalled"] for r in finished))  # fmt: skip
    except KeyboardInterrupt:
        launcher.cancel()
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        launcher.close()
    return rows, interrupted


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def describe_row(row: dict[str, Any], study: Study) -> str:
    """A finished run in one line: its name, final loss, metrics and verdict (or why it failed)."""
    if row.get("final_loss", "") == "":
        return f"{row['run']}: FAILED ({row.get('error', '')})"
    state = "" if "stalled" not in row else \
        f", stalled ({row.get('diagnosis') or 'no event'})" if row["stalled"] else ", learned"  # fmt: skip
    if row.get("status") == "failed":
        state = f", FAILED ({row.get('error', '')})"
    shown = "".join(f", {m} {row[m]:.4g}" for m in study.metrics if row.get(m, "") != "")
    return f"{row['run']}: final loss {row['final_loss']:.4g}{shown}{state} after {row['epochs']} epochs"


def _write_json(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)
