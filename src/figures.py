"""Redraw the README's pictures from fresh runs: one command.

    python -m src.figures [--out notebooks/figures] [--study studies/vanishing] [--epochs 700]

Runs the default config (the 7-layer sigmoid net: flat stalls) and the same net at depth 18
(vanishing stalls) in a temporary folder, then writes into ``--out``:

- ``gradient_flow.png``: both runs' gradient profiles at the start, at each stall (what its
  diagnosis saw) and at the end, side by side;
- ``loss.png``: the default run's loss with its stall and escape markers;
- ``layer_activity.png``: both runs' saturated share per layer over training (the picture of
  Glorot & Bengio 2010) and their update-to-weight ratios;
- ``dnnex_fitted_curve.png``: ``configs/dnnex.yaml`` fitted (``--dnnex-epochs``), its curve over the true one;
- ``blobs_decision_regions.png``: ``configs/blobs.yaml`` fitted, its decision regions with the points;
- ``final_loss_vs_depth.png``: redrawn from the study's ``summary.csv`` when ``--study`` has one
  (``python -m src.study configs/study/vanishing.yaml`` writes it; the study itself is not re-run);
- ``tensorboard_custom_scalars.png``, ``tensorboard_layers.png`` and ``tensorboard_hparams.png``:
  TensorBoard on the default run, opened in Chromium through Playwright, when both are installed
  (Debian's ``chromium`` package and ``pip install playwright``; no browser download); otherwise it
  says it left them out.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.errors import fail

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str | None:
    """The system Chromium, or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why a browser check cannot run here, or ``None`` when it can."""
    if chromium() is None:
        return "no Chromium (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no Playwright (pip install playwright)"
    return None


@contextlib.contextmanager
def tensorboard(logdir: Path, timeout: float = 90) -> Iterator[str]:
    """``tensorboard --logdir LOGDIR`` on a free loopback port, until it answers; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or shutil.which("tensorboard")
    server = subprocess.Popen(
        [exe, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"tensorboard exited: {server.stderr.read().decode()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensorboard did not answer within {timeout:.0f} s")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/data/runs", timeout=5).read()
                break
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def look_at_tensorboard(logdir: Path, out: Path, timeout_ms: float = 60_000) -> dict[str, Any]:
    """Open TensorBoard on ``logdir`` in Chromium as a user would and report what the page shows.

    Returns the number of lines in the "gradient norm of every layer (log10)" and "saturated share
    per layer" charts, the series of the loss and the update-ratio charts, the runs the HPARAMS
    table lists and whether it shows the final metrics; saves ``tensorboard_custom_scalars.png``
    (the "Why is it not learning?" charts), ``tensorboard_layers.png`` ("What each layer does") and
    ``tensorboard_hparams.png`` into ``out``."""
    from playwright.sync_api import expect, sync_playwright

    seen: dict[str, Any] = {}
    with tensorboard(logdir) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/#custom_scalars")
            cards = page.locator("tf-custom-scalar-multi-line-chart-card")
            grads = cards.filter(has_text="gradient norm of every layer (log10)")
            loss = cards.filter(has_text="loss, with stall / divergence markers")
            for card in (grads, loss):  # the charts fill in as the data arrives
                expect(card.locator("text=/Matches \\(\\d+\\)/")).not_to_have_text("Matches (0)", timeout=timeout_ms)
            seen["layer_lines"] = grads.locator(".match-list-entry").count()
            seen["loss_series"] = [" ".join(t.split()) for t in loss.locator(".match-list-entry").all_text_contents()]
            saturated = cards.filter(has_text="saturated share per layer")
            ratio = cards.filter(has_text="update-to-weight ratio per layer")
            for card in (saturated, ratio):
                expect(card.locator("text=/Matches \\(\\d+\\)/")).not_to_have_text("Matches (0)", timeout=timeout_ms)
            seen["saturated_lines"] = saturated.locator(".match-list-entry").count()
            seen["update_ratio_series"] = [
                " ".join(t.split()) for t in ratio.locator(".match-list-entry").all_text_contents()
            ]
            page.wait_for_timeout(1000)  # the last redraw
            section = page.locator("tf-category-paginated-view").filter(has_text="Why is it not learning?")
            section.screenshot(path=str(out / "tensorboard_custom_scalars.png"))
            layers = page.locator("tf-category-paginated-view").filter(has_text="What each layer does")
            layers.screenshot(path=str(out / "tensorboard_layers.png"))
            page.goto(f"{url}/#hparams")
            final = page.locator("text=final/train/loss").first
            expect(final).to_be_attached(timeout=timeout_ms)
            seen["hparams_final_metrics"] = final.count() > 0
            seen["hparams_runs"] = sorted(set(page.locator("text=/^version_\\d+$/").all_text_contents()))
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "tensorboard_hparams.png"))
        finally:
            browser.close()
    return seen


def fit(root: Path, *args: str) -> Path:
    """A CLI fit in this process, in ``root``; returns its run directory."""
    from src.cli import main

    main(["fit", *args, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"])
    return root / "lightning_logs" / "version_0"


def study_figure(study_dir: Path, out: Path) -> Path | None:
    """``final_loss_vs_depth.png`` from a study's ``summary.csv`` (``None`` if there is none, or if its
    depth does not vary)."""
    from src.study import Study, aggregate, load_summary, plot_final_loss

    path = study_dir / "summary.csv"
    if not path.is_file():
        return None
    rows = load_summary(path)
    if len({r.get("depth") for r in rows}) < 2:
        return None
    below = next((c for c in rows[0] if c.startswith("epoch_below_")), None)
    study = Study(solved_below=float(below.removeprefix("epoch_below_")) if below else None)
    plot_final_loss(aggregate(rows, study), out / "final_loss_vs_depth.png")
    return out / "final_loss_vs_depth.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "notebooks" / "figures")
    parser.add_argument("--study", type=Path, default=Path("studies/vanishing"), help="a study's output folder")
    parser.add_argument("--epochs", type=int, default=700, help="epochs of each toy run (the default config: 2000)")
    parser.add_argument("--dnnex-epochs", type=int, default=6000, help="epochs of the dnnex run (its config's: 6000)")
    args = parser.parse_args(argv)
    for option, value in (("--epochs", args.epochs), ("--dnnex-epochs", args.dnnex_epochs)):
        if value < 1:  # checked before the first run starts, not after minutes of training
            fail(f"{option} must be >= 1 (epochs of that run), got {value}", status=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from src.report import load_run, plot_fit, plot_gradient_flow, plot_layer_activity, plot_loss, plot_update_ratio

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        flat = load_run(fit(Path(tmp) / "depth7", f"--trainer.max_epochs={args.epochs}"))
        deep = load_run(fit(Path(tmp) / "depth18", f"--trainer.max_epochs={args.epochs}", "--model.depth=18"))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        plot_gradient_flow(flat, axes[0])
        plot_gradient_flow(deep, axes[1])
        axes[0].set_title("7-layer sigmoid net (default config): every layer ~1e-5", fontsize=10)
        axes[1].set_title("18 layers: the first layers' gradients vanish", fontsize=10)
        fig.tight_layout()
        written = [args.out / "gradient_flow.png"]
        fig.savefig(written[0], dpi=110)
        plt.close(fig)
        plot_loss(flat).savefig(args.out / "loss.png", dpi=110)
        written.append(args.out / "loss.png")
        fig, axes = plt.subplots(2, 2, figsize=(13, 8))
        for column, run in enumerate((flat, deep)):
            plot_layer_activity(run, axes[0][column])
            plot_update_ratio(run, axes[1][column])
        axes[0][0].set_title("7 layers: the share of sigmoid outputs at a bound, per layer", fontsize=10)
        axes[0][1].set_title("18 layers: the same", fontsize=10)
        axes[1][0].set_title("7 layers: log10 update-to-weight ratio per layer", fontsize=10)
        axes[1][1].set_title("18 layers: the same", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.out / "layer_activity.png", dpi=100)
        plt.close(fig)
        written.append(args.out / "layer_activity.png")
        dnnex = fit(Path(tmp) / "dnnex", "--config", str(REPO / "configs" / "dnnex.yaml"),
                    f"--trainer.max_epochs={args.dnnex_epochs}")  # fmt: skip
        plot_fit(load_run(dnnex)).savefig(args.out / "dnnex_fitted_curve.png", dpi=110)
        blobs = fit(Path(tmp) / "blobs", "--config", str(REPO / "configs" / "blobs.yaml"))
        plot_fit(load_run(blobs)).savefig(args.out / "blobs_decision_regions.png", dpi=110)
        written += [args.out / "dnnex_fitted_curve.png", args.out / "blobs_decision_regions.png"]
        if (study := study_figure(args.study, args.out)) is not None:
            written.append(study)
        else:
            print(f"left final_loss_vs_depth.png as it is: no {args.study / 'summary.csv'} (run the study first)")
        if (why := browser_missing()) is None:
            look_at_tensorboard(flat.path.parent, args.out)
            written += [args.out / f"tensorboard_{name}.png" for name in ("custom_scalars", "layers", "hparams")]
        else:
            print(f"left out the TensorBoard screenshots: {why}")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
