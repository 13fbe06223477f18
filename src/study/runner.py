"""Run a study's grid points: each one a normal fit of the template's CLI, in worker processes."""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from src.errors import one_line
from src.names import TRAIN_LOSS

from .spec import Study, run_args, run_name

RUN_LOG = "run.log"  # beside each run's TensorBoard folder: its warnings and Lightning's messages
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
        stop = EarlyStopping(
            TRAIN_LOSS, patience=sys.maxsize, stopping_threshold=study.stop_below, check_on_train_epoch_end=True
        )
        cli.trainer.callbacks.append(stop)
    return cli, probe


def run_point(study: Study, point: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """One fit (and test, with ``test: true``), in a worker process; returns its row of the summary.
    What the run warns goes to ``runs/<name>/run.log``."""
    from src.callbacks import PlateauDetector

    start = time.perf_counter()
    with run_log(Path(out_dir) / "runs" / run_name(point, study) / RUN_LOG):
        cli, probe = prepare_run(study, point, out_dir)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
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
    return row


def run_all(study: Study, points: list[dict[str, Any]], out_dir: Path, workers: int) -> list[dict[str, Any]]:
    """Every point in ``workers`` processes, with an overall bar on stderr and a line per finished run on
    stdout; a run that fails is a line, and the others go on. Returns the finished runs' rows."""
    start, rows = time.perf_counter(), []
    context = multiprocessing.get_context("spawn")
    bar = tqdm(total=len(points), desc="study", unit="run", file=sys.stderr, dynamic_ncols=True)
    with bar, ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_point, study, p, str(out_dir)): p for p in points}
        for done, future in enumerate(as_completed(futures), start=1):
            point = futures[future]
            bar.update(1)
            try:
                row = future.result()
            except Exception as err:  # one failed run must not lose the others
                bar.write(f"[{done}/{len(points)}] {run_name(point, study)}: FAILED ({one_line(err)})", file=sys.stdout)
                continue
            rows.append(row)
            state = "" if "stalled" not in row else \
                f", stalled ({row.get('diagnosis') or 'no event'})" if row["stalled"] else ", learned"  # fmt: skip
            shown = "".join(f", {m} {row[m]:.4g}" for m in study.metrics if row.get(m, "") != "")
            elapsed = time.perf_counter() - start
            bar.write(f"[{done}/{len(points)}] {row['run']}: final loss {row['final_loss']:.4g}{shown}{state} "
                      f"after {row['epochs']} epochs ({elapsed:.0f} s elapsed)", file=sys.stdout)  # fmt: skip
            if "stalled" in row:
                bar.set_postfix(learned=sum(not r["stalled"] for r in rows), stalled=sum(r["stalled"] for r in rows))
    return rows
