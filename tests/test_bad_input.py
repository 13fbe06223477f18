"""The bad-input catalogue: each case goes through the CLI's entry function and must end in one clear line.

Every case must exit non-zero, print exactly one ``error:`` line that names the option or file,
and leave the files of an earlier run in the working directory untouched. The catalogue runs
in-process (``src.cli.main``, the function ``python -m src.train`` calls); a few cases also run as
a real process, for what only a process shows: its exit status and that no traceback is printed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_cli

CONFIGS = REPO / "configs"
MNIST = ("--config", str(CONFIGS / "mnist.yaml"), "--data.init_args.data_dir", "mnist_data")
DNNEX = ("--config", str(CONFIGS / "dnnex.yaml"))


def callbacks_yaml(*callbacks: str) -> str:
    return "trainer:\n  callbacks:\n" + "".join(f"    - {c}\n" for c in callbacks)


FILES = {
    "malformed.yaml": "model:\n  depth: [1\n",
    "unknown_key.yaml": "model:\n  depthh: 3\n",
    "patience0.yaml": callbacks_yaml("{class_path: src.callbacks.PlateauDetector, init_args: {patience: 0}}"),
    "momentum15.yaml": callbacks_yaml(
        "{class_path: src.callbacks.PlateauDetector}",
        "{class_path: src.callbacks.PlateauEscape, init_args: {actions: [{momentum: 1.5}]}}",
    ),
    "typo_action.yaml": callbacks_yaml(
        "{class_path: src.callbacks.PlateauDetector}",
        "{class_path: src.callbacks.PlateauEscape, init_args: {actions: [{mommentum: 0.9}]}}",
    ),
    "momentum_policy.yaml": callbacks_yaml(
        "{class_path: src.callbacks.PlateauDetector}",
        "{class_path: src.callbacks.PlateauEscape, init_args: {actions: [{momentum: 0.9}]}}",
    ),
    "norm_type0.yaml": callbacks_yaml("{class_path: src.callbacks.GradNormMonitor, init_args: {norm_type: 0}}"),
    "garbled.csv": "x,y\n0.1,1\n0.2,oops\n",
    "not_a_checkpoint.ckpt": "hello\n",
}

# (id, arguments after `fit`, what the error line must contain)
CASES = [
    ("depth zero", ["--model.depth", "0"], "model.depth"),
    ("depth not a number", ["--model.depth", "abc"], "model.depth"),
    ("negative width", ["--model.width", "-3"], "model.width"),
    ("negative width in a list", ["--model.width", "[10, -1]"], "model.width"),
    ("unknown activation", ["--model.activation", "swish"], "model.activation"),
    ("unknown init", ["--model.init", "orthogonalish"], "model.init"),
    ("dropout above 1", ["--model.dropout", "1.5"], "model.dropout"),
    ("batch_norm not a bool", ["--model.batch_norm", "maybe"], "model.batch_norm"),
    ("negative lr", ["--optimizer.init_args.lr", "-1"], "Invalid learning rate"),
    ("negative weight decay", ["--optimizer.init_args.weight_decay", "-1"], "weight_decay"),
    ("unknown optimizer class", ["--optimizer.class_path", "torch.optim.Nope"], "torch.optim.Nope"),
    (
        "momentum action on Adam",
        [
            "--config",
            str(CONFIGS / "default.yaml"),
            "--config",
            "momentum_policy.yaml",
            "--optimizer",
            "torch.optim.Adam",
        ],
        "momentum",
    ),  # fmt: skip
    ("unknown data class", ["--data.class_path", "src.data.Nope"], "src.data.Nope"),
    ("unknown toy variant", ["--data.init_args.variant", "spiral"], "variant"),
    ("zero samples", ["--data.init_args.n_samples", "0"], "n_samples"),
    ("zero batch size", ["--data.init_args.batch_size", "0"], "batch_size"),
    ("negative workers", ["--data.init_args.num_workers", "-1"], "num_workers"),
    ("max_epochs below -1", ["--trainer.max_epochs", "-5"], "max_epochs"),
    ("validation every 0 epochs", ["--trainer.check_val_every_n_epoch", "0"], "check_val_every_n_epoch"),
    ("more CPU devices than cores", ["--trainer.accelerator", "cpu", "--trainer.devices", "512"], "trainer.devices"),
    ("unknown precision", ["--trainer.precision", "7"], "trainer.precision"),
    ("unknown callback class", ["--trainer.callbacks+=src.callbacks.Nope"], "src.callbacks.Nope"),
    ("seed not a number", ["--seed_everything", "abc"], "seed_everything"),
    ("missing config file", ["--config", "nope.yaml"], "nope.yaml"),
    ("malformed config file", ["--config", "malformed.yaml"], "malformed.yaml line 3"),
    ("unknown config key", ["--config", "unknown_key.yaml"], "model.depthh"),
    ("detector patience 0", ["--config", str(CONFIGS / "default.yaml"), "--config", "patience0.yaml"], "patience"),
    ("escape momentum 1.5", ["--config", str(CONFIGS / "default.yaml"), "--config", "momentum15.yaml"], "momentum"),
    ("escape action typo", ["--config", str(CONFIGS / "default.yaml"), "--config", "typo_action.yaml"], "mommentum"),
    ("grad norm_type 0", ["--config", str(CONFIGS / "default.yaml"), "--config", "norm_type0.yaml"], "norm_type"),
    ("missing CSV", [*DNNEX, "--data.init_args.csv_path", "nope.csv"], "nope.csv"),
    ("garbled CSV", [*DNNEX, "--data.init_args.csv_path", "garbled.csv"], "garbled.csv line 3, column 'y'"),
    ("MNIST missing, no download", [*MNIST, "--data.init_args.download", "false"], "train-images-idx3-ubyte"),
    ("MNIST raw_dir not a folder", [*MNIST, "--data.init_args.raw_dir", "no_such_dir"], "raw_dir"),
    ("MNIST with no network", [*MNIST, "--data.init_args.mirror", "http://127.0.0.1:9/"], "could not download mnist"),
    ("MNIST garbled IDX file", [*MNIST, "--data.init_args.data_dir", "garbled_idx"], "train-images-idx3-ubyte is"),
    ("missing checkpoint", ["--ckpt_path", "nope.ckpt"], "nope.ckpt"),
    ("not a checkpoint", ["--ckpt_path", "not_a_checkpoint.ckpt"], "not a checkpoint"),
    ("ckpt_path last with no run", ["--ckpt_path", "last", "--trainer.default_root_dir", "fresh"], "ckpt_path=last"),
]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] != "more CPU devices than cores"]
else:
    CASES.append(("GPU on a machine without one", ["--trainer.accelerator", "gpu"], "gpu"))


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def workdir(tmp_path):
    """A working directory with the bad files in it and an earlier run that must survive."""
    for name, content in FILES.items():
        (tmp_path / name).write_text(content)
    earlier = tmp_path / "lightning_logs" / "version_0"
    (earlier / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}}, earlier / "checkpoints" / "last.ckpt")
    (earlier / "config.yaml").write_text("model: {depth: 3}\n")
    (earlier / "stall_events.json").write_text("[]\n")
    raw = tmp_path / "garbled_idx" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + bytes(30))  # a header that promises more than is there
    (tmp_path / "fresh").mkdir()
    return tmp_path


def test_the_catalogue_has_at_least_25_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 25


def check_one_line_nonzero_and_nothing_lost(result, expected: str, workdir: Path, before: dict[str, str]) -> None:
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert expected in errors[0], errors[0]
    after = digest(workdir)
    assert {name: after.get(name) for name in before} == before  # nothing the user had changed or went away


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_loses_nothing(workdir, main, args, expected):
    before = digest(workdir)
    result = main("fit", "--trainer.max_epochs", "2", *args)
    check_one_line_nonzero_and_nothing_lost(result, expected, workdir, before)


# One case of each way to fail: the parser (exit 2), a file check before the run, an error inside fit.
PROCESS_CASES = ["unknown activation", "missing checkpoint", "garbled CSV"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PROCESS_CASES)
def test_bad_input_in_a_real_process_exits_nonzero_without_a_traceback(workdir, name):
    args, expected = next(case[1:] for case in CASES if case[0] == name)
    before = digest(workdir)
    result = run_cli("fit", "--trainer.max_epochs", "2", *args, cwd=workdir, timeout=300)
    check_one_line_nonzero_and_nothing_lost(result, expected, workdir, before)


def test_debug_switch_lets_the_exception_through(main, monkeypatch):
    monkeypatch.setenv("TEMPLATE_DEBUG", "1")
    with pytest.raises(Exception, match="nope.ckpt"):  # uncaught: Python prints its traceback
        main("fit", "--ckpt_path", "nope.ckpt")
