"""Command line entry point: ``python -m src.train [fit|validate|test|predict] [--config FILE] [options]``.

The CLI itself is :mod:`src.cli`. This module stays light, so that ``python -m src.train --help``
answers at once instead of after importing torch and Lightning (seconds); ``fit --help`` and every
real command load the CLI.
"""

from __future__ import annotations

import sys

USAGE = """\
usage: python -m src.train [fit|validate|test|predict] [--config FILE ...] [--section.option VALUE ...]

Train and evaluate the template's MLPs with LightningCLI.

  python -m src.train                              fit with configs/default.yaml (the stalling sigmoid net)
  python -m src.train fit --config configs/mnist.yaml
  python -m src.train fit --help                   every option of fit, with its type and default
  python -m src.train fit --print_config           the full resolved config, to copy and edit
  python -m src.train fit --ckpt_path last         resume the newest run under lightning_logs/
  python -m src.train test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt

subcommands: fit, validate, test, predict (each with its own --help). With no subcommand the CLI
runs fit; with no --config it uses configs/default.yaml. A bad option or file is reported in one
line; set TEMPLATE_DEBUG=1 for the traceback.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the process's exit status."""
    if (sys.argv[1:] if argv is None else argv) in (["-h"], ["--help"]):
        print(USAGE, end="")
        return 0
    from src.cli import main as run_cli

    return run_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
