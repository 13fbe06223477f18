"""Run a grid of ordinary logged runs over any config options and summarise it.

    python -m src.study configs/study/vanishing.yaml [--workers N] [--out DIR] [--base-config FILE]

The study file names a base experiment config and the axes of the grid; each point is a normal fit
of ``python -m src.train`` (same CLI, own TensorBoard run under ``OUT/runs/``), run in worker
processes. Writes ``OUT/summary.csv`` (one row per run: the axes first, then the results),
``OUT/summary.md`` (one row per grid point over the seeds, with a column for each axis that varies,
then every run) and, when depth varies, ``OUT/final_loss_vs_depth.png``; prints progress as runs finish.
Each run's warnings and Lightning's messages go to ``OUT/runs/<run>/run.log``.

Axes (any mix; at least one):

- ``grid``: ``{option: [values]}``, any option ``python -m src.train`` takes, for example
  ``{model.init: [default, kaiming_normal], model.dropout: [0.0, 0.3]}``: every combination runs.
- ``variants``: ``{label: {option: value, ...}}``: named settings, one axis (``variant``), for
  experiments that are a list rather than a product (the MNIST labs).
- Shorthands: ``activations`` (``model.activation``), ``depths`` (``model.depth``), ``seeds``
  (``seed_everything``; the table aggregates over them), ``optimizers`` (``{label: {class_path,
  init_args}}``) and ``policies`` (``{label: config mapping or null}``, each stacked on ``config``,
  its ``trainer.callbacks`` added to ``config``'s: for example with and without ``PlateauEscape``).

Every option and value is checked by the CLI's own parser before any run starts; a bad one ends
the study in one line that names it.

Other keys: ``base_config``, ``out_dir``, ``config`` (a config mapping stacked on ``base_config`` for
every run, as a second ``--config`` would be), ``args`` (extra CLI options for every run),
``test`` (``true``: run ``trainer.test`` after each fit), ``metrics`` (metrics whose final value
each run reports, e.g. ``[test/acc]``; the table shows their median over seeds), ``count_below``
(``{metric: threshold}``: how many runs of each row end below it), ``stalled_above`` (a final train
loss above it counts as stalled; default 0.5, ``null`` leaves the column out), ``solved_below`` (the
train loss whose first epoch below it is reported; default 0.05, ``null`` leaves it out) and
``stop_below`` (optional: a run stops once its train loss is below it, through Lightning's
``EarlyStopping(stopping_threshold=)``; it must be at most ``solved_below`` and ``stalled_above``,
so that neither column changes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from src.errors import fail, one_line_errors

from .launchers import LaunchError, make_launcher
from .runner import finished_rows, run_all
from .spec import StudyError, check_options, grid, load_study, run_name
from .table import write_outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study YAML file, e.g. configs/study/vanishing.yaml")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (default: cores)")
    parser.add_argument("--out", help="output folder (default: the study's out_dir)")
    parser.add_argument(
        "--base-config", help="run the grid on this experiment config instead of the file's base_config "
        "(e.g. configs/mnist.yaml for the MNIST labs on MNIST)"
    )  # fmt: skip
    parser.add_argument("--launcher", default="local", help="local (processes here, the default) or ray")
    parser.add_argument("--address", help="with --launcher ray: a Ray cluster to join (host:port, or auto)")
    parser.add_argument("--cpus-per-run", type=int, default=1, help="CPUs each run takes (and its torch threads)")
    parser.add_argument("--gpus-per-run", type=float, default=0, help="GPUs each run takes (--launcher ray)")
    parser.add_argument("--rerun", action="store_true", help="run every point again, finished or not")
    args = parser.parse_args(argv)
    with one_line_errors((StudyError, LaunchError), status=2):
        study = load_study(args.study, args.base_config)
        if args.workers < 1:
            raise StudyError(f"--workers must be >= 1, got {args.workers}")
        check_options(study)
        points = grid(study)
        launcher = make_launcher(
            args.launcher, min(args.workers, len(points)), args.address, args.cpus_per_run, args.gpus_per_run
        )
        where = launcher.start()
    out_dir = Path(args.out or study.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = {} if args.rerun else finished_rows(study, points, out_dir)
    todo = [p for p in points if run_name(p, study) not in kept]
    print(f"{len(todo)} runs on {where}, logs under {out_dir / 'runs'}"
          + (f" ({len(kept)} finished before: kept; --rerun runs them again)" if kept else ""), flush=True)  # fmt: skip
    rows, interrupted = [], False
    if todo:
        rows, interrupted = run_all(study, todo, out_dir, launcher, args.cpus_per_run)
    else:
        launcher.close()
    rows = [*kept.values(), *rows]
    if interrupted:
        finished = len([r for r in rows if r.get("final_loss", "") != ""])
        print(f"interrupted: {finished} of {len(points)} runs finished and kept; run the same command again "
              "to finish the rest", file=sys.stderr)  # fmt: skip
    if not any(r.get("final_loss", "") != "" for r in rows):
        fail("every run failed; run one alone with python -m src.train to see why", status=130 if interrupted else 1)
    for name in study.metrics:
        missing = [r["run"] for r in rows if r.get(name, "") == "" and r.get("final_loss", "") != ""]
        if missing:
            print(f"note: {len(missing)} run(s) logged no {name} ({', '.join(missing[:3])}...); "
                  f"is it logged{' (test: true runs trainer.test)' if name.startswith('test/') else ''}?")  # fmt: skip
    command = "python -m src.study " + " ".join(sys.argv[1:] if argv is None else argv)
    written = write_outputs(rows, study, out_dir, command)
    print((out_dir / "summary.md").read_text())
    print("wrote " + ", ".join(map(str, written)))
    if interrupted:
        sys.exit(130)
