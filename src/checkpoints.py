"""Which checkpoint ``--ckpt_path`` means: ``last`` resolves to the newest run's, a path is checked first."""

from __future__ import annotations

import zipfile
from pathlib import Path


def newest_last_checkpoint(root: Path) -> Path | None:
    """The ``last.ckpt`` written most recently under ``root/lightning_logs/*/checkpoints/``."""
    candidates = [p for p in Path(root).glob("lightning_logs/*/checkpoints/last.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def run_version(checkpoint: Path) -> int | None:
    """N when ``checkpoint`` lies in ``.../version_N/checkpoints/``: the run a resumed fit goes on logging into.

    >>> run_version(Path("lightning_logs/version_3/checkpoints/last.ckpt"))
    3
    >>> run_version(Path("elsewhere/last.ckpt")) is None
    True
    """
    run = checkpoint.parent.parent.name
    number = run.removeprefix("version_")
    return int(number) if run.startswith("version_") and number.isdigit() else None


def resolve_ckpt_path(ckpt_path: str, root: str | Path) -> tuple[str, int | None]:
    """``last`` -> the newest run's ``last.ckpt`` under ``root``; a given path must be a checkpoint file.

    Returns the path and the run's version number (see :func:`run_version`). Lightning's own
    special values (``best``, ``hpc``, ``registry...``) pass through.
    """
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
        return ckpt_path, None
    if ckpt_path == "last":
        found = newest_last_checkpoint(Path(root))
        if found is None:
            raise FileNotFoundError(
                f"ckpt_path=last: no lightning_logs/*/checkpoints/last.ckpt under {root}; "
                "run fit first, or give the checkpoint's path"
            )
        path = found
    else:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file; give a .ckpt file or 'last'")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"ckpt_path={ckpt_path}: not a checkpoint (torch.save writes a zip archive)")
    return str(path), run_version(path)
