"""The study's picture: median final train loss against depth, one line per other axis value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .table import axis_columns, order_key


def plot_final_loss(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [c for c in axis_columns(table, "runs") if c != "depth"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({tuple(r[c] for c in others) for r in table}, key=lambda k: [order_key(v) for v in k]):
        points = sorted((r for r in table if tuple(r[c] for c in others) == key), key=lambda r: r["depth"])
        label = ", ".join(str(v) for v in key if v != "config") or "median"
        losses = [max(r.get("median_final_loss", r.get("final_loss")), 1e-8) for r in points]
        ax.plot([r["depth"] for r in points], losses, marker="o", label=label)
    ax.axhline(0.6931, color="gray", linestyle="--", linewidth=0.8, label="ln 2 (chance)")
    ax.set_yscale("log")
    ax.set_xlabel("depth (Linear layers)")
    ax.set_ylabel("median final train loss over seeds")
    ax.set_title("where deep MLPs stop learning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
