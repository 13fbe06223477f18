"""The stall zoo (configs/study/stall_zoo.yaml): which stalls the default policy gets out of, at what
cost, and whether it ever makes a run worse.

    python -m benchmarks.stall_zoo                      # run the study (~7 min with --workers 2), then the table
    python -m benchmarks.stall_zoo --summary studies/stall_zoo/summary.csv   # the table of a finished study
    python -m benchmarks.stall_zoo --study configs/study/stall_zoo_minibatch.yaml   # the mini-batch zoo

Per cell (a variant of the study, without its ``_fix`` twin) and seed it pairs the run without the
policy with the run with it, and the hindsight fix's run with no policy. A run *stalls* when its
final train loss is above the study's ``stalled_above``; it *reaches the target* when its loss went
below ``solved_below`` (the epoch is the study's ``epoch_below_...`` column). It is *made worse*
when the policy's run diverged (where the run without it did not), or ended above the run without it
by more than 1% (and 1e-3), unless it ended below ``stop_below``: the study stops a run there as
converged, so two such runs differ only in the step each crossed it at. The fix's run with the
policy is held to the same rule against the fix's run without it (the last column): a remedy must
not harm a net that learns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from src.study.spec import StudyError, load_study
from src.study.table import load_summary

STUDY = Path(__file__).resolve().parents[1] / "configs" / "study" / "stall_zoo.yaml"
OPTIMIZERS = ("adamw", "adam", "rmsprop", "momentum", "sgd")  # how a cell's name ends: its optimizer


def made_worse(with_policy: Any, without: Any, converged: float | None = None) -> bool:
    """Whether the final loss ``with_policy`` is worse than ``without`` (see the module's docstring).

    >>> made_worse(0.70, 0.69), made_worse(0.6905, 0.69), made_worse(float("nan"), 0.69)
    (True, False, True)
    >>> made_worse(0.0064, 0.0042), made_worse(0.0064, 0.0042, converged=0.01)  # both stopped as converged
    (True, False)
    >>> made_worse(float("nan"), float("nan"))  # it diverged without the policy too
    False
    """
    loss, base = float(with_policy), float(without)
    if converged is not None and loss < converged:
        return False
    if loss != loss:  # diverged (NaN): worse unless it did without the policy as well
        return base == base
    return loss > max(base * 1.01, base + 1e-3)


def cell_facts(
    rows: list[dict[str, Any]], target: float, stalled_above: float, converged: float | None = None
) -> list[dict[str, Any]]:
    """One fact row per (cell, seed): stalled without the policy, reached the target with it and the
    epochs to it, made worse, the fix's epochs to the target, and whether the policy made the fix worse
    (None where the fix was not run with it)."""
    below = f"epoch_below_{target}"
    runs = {(r["variant"], r["policy"], str(r["seed"])): r for r in rows}
    facts = []
    for (variant, policy, seed), none in sorted(runs.items()):
        if policy != "none" or variant.endswith("_fix"):
            continue
        default, fix = runs.get((variant, "default", seed)), runs.get((f"{variant}_fix", "none", seed))
        if default is None:
            continue
        fixed = runs.get((f"{variant}_fix", "default", seed))
        loss_none, loss_default = float(none["final_loss"]), float(default["final_loss"])
        facts.append({
            "cell": variant, "seed": seed, "stalled": loss_none > stalled_above,
            "reached": default.get(below, "") != "", "epochs": _int(default.get(below)),
            "fix_epochs": _int(fix.get(below)) if fix else None,
            "worse": made_worse(loss_default, loss_none, converged),
            "fix_worse": made_worse(fixed["final_loss"], fix["final_loss"], converged) if fix and fixed else None,
            "loss_none": loss_none, "loss_default": loss_default,
        })  # fmt: skip
    return facts


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(float(value))


def data_of(cell: str) -> str:
    return cell.split("_")[0] if not cell.startswith("two_clusters") else "two_clusters"


def optimizer_of(cell: str) -> str:
    return next((o for o in OPTIMIZERS if cell.endswith(o) or f"_{o}_" in cell), "sgd")


def table(facts: list[dict[str, Any]]) -> str:
    """Markdown: a row per cell (its median epochs to the target with the policy, the fix's, and the first
    over the second: the issue's aim is 3x), then the share of stalled runs freed per optimizer and per
    data set."""
    header = "| cell | stalled without | of those, reached with | median epochs with | fix: median epochs | x the fix"
    lines = [header + " | made worse | fix made worse |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ratios: list[float] = []  # the policy's median epochs to the target over the fix's, per cell with both
    by_cell: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for fact in facts:
        by_cell[fact["cell"]].append(fact)
    for cell, group in by_cell.items():
        stalled = [f for f in group if f["stalled"]]
        freed = [f for f in stalled if f["reached"]]
        epochs, fix = _median(f["epochs"] for f in freed), _median(f["fix_epochs"] for f in group)
        ratio = epochs / fix if epochs is not None and fix else None
        ratios += [ratio] if ratio is not None else []
        lines.append(f"| {cell} | {len(stalled)}/{len(group)} | {len(freed)}/{len(stalled)} | {_g(epochs)} | {_g(fix)}"
                     f" | {'-' if ratio is None else f'{ratio:.1f}x'} | {sum(f['worse'] for f in group)}/{len(group)}"
                     f" | {_share(group, 'fix_worse')} |")  # fmt: skip
    for name, key in (("optimizer", optimizer_of), ("data", data_of)):
        lines += ["", f"| {name} | stalled runs freed | made worse |", "| --- | --- | --- |"]
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for fact in facts:
            groups[key(fact["cell"])].append(fact)
        for label, group in sorted(groups.items()):
            stalled = [f for f in group if f["stalled"]]
            freed = sum(f["reached"] for f in stalled)
            lines.append(f"| {label} | {freed}/{len(stalled)} | {sum(f['worse'] for f in group)}/{len(group)} |")
    stalled = [f for f in facts if f["stalled"]]
    lines += ["", f"All: {sum(f['reached'] for f in stalled)}/{len(stalled)} stalled runs freed, "
              f"{sum(f['worse'] for f in facts)}/{len(facts)} made worse; fix runs made worse: "
              f"{_share(facts, 'fix_worse')}; to the target within 3x of the fix's time in "
              f"{sum(r <= 3 for r in ratios)} of {len(ratios)} cells."]  # fmt: skip
    return "\n".join(lines)


def _share(facts: list[dict[str, Any]], key: str) -> str:
    """``hits/runs`` over the facts that have ``key`` (``-``: none has it)."""
    known = [f[key] for f in facts if f.get(key) is not None]
    return f"{sum(known)}/{len(known)}" if known else "-"


def _median(values) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, help="a finished study's summary.csv (default: run the study)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--study", type=Path, default=STUDY, help="the study file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.summary is None:
        from src.study.cli import main as study_main

        try:
            study_main([str(args.study), "--workers", str(args.workers)])
        except SystemExit as exit_:  # a bad study or option: it said why
            if exit_.code:
                return int(exit_.code) if isinstance(exit_.code, int) else 1
        args.summary = Path(study.out_dir) / "summary.csv"
    if not args.summary.is_file():
        print(f"error: {args.summary} does not exist; run the study first, or give --summary", file=sys.stderr)
        return 2
    facts = cell_facts(load_summary(args.summary), study.solved_below, study.stalled_above, study.stop_below)
    print(table(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
