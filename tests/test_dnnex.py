"""The dnnex data: the generator against the original file, the CSV loader and its errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from src.data import DataFileError, DnnexDataModule
from src.data.dnnex import load_dnnex_csv, make_dnnex
from src.models import MLPClassifier
from tests.helpers import REPO, SHARED_DATA, MemoryLogger, quiet_trainer

DNNEX_CSV = SHARED_DATA / "dnnex.csv"
needs_shared_csv = pytest.mark.skipif(not DNNEX_CSV.is_file(), reason=f"{DNNEX_CSV} is not there")


def read_columns(path: Path) -> dict[str, torch.Tensor]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: torch.tensor([float(row[name]) for row in rows]) for name in rows[0]}


@needs_shared_csv
def test_generated_prob_matches_the_original_file():
    original = read_columns(DNNEX_CSV)
    x, prob, y = make_dnnex(len(original["x"]), seed=0)
    assert torch.allclose(x.double(), original["x"].double(), atol=1e-6, rtol=0)
    assert (prob.double() - original["prob"].double()).abs().max() < 1e-6
    assert set(y.unique().tolist()) <= {0.0, 1.0}


def test_generator_is_seeded_and_follows_prob():
    x, prob, y = make_dnnex(20000, seed=3)
    assert torch.equal(y, make_dnnex(20000, seed=3)[2])
    assert not torch.equal(y, make_dnnex(20000, seed=4)[2])
    # Bernoulli(prob): the mean of y is the mean of prob within a few standard errors
    assert abs(y.mean() - prob.mean()) < 4 * (prob * (1 - prob)).mean().sqrt() / len(y) ** 0.5
    assert torch.allclose(prob[x < 0], torch.sigmoid(15 * x[x < 0] + 5))
    assert torch.allclose(prob[x >= 0], torch.sigmoid(-5 * x[x >= 0] + 5))


@needs_shared_csv
def test_loading_the_original_file_gives_its_2000_rows():
    original = read_columns(DNNEX_CSV)
    dm = DnnexDataModule(csv_path=str(DNNEX_CSV))
    dm.setup("fit")
    x, y = dm.train_set.tensors
    assert x.shape == (2000, 1) and y.shape == (2000,)
    assert torch.equal(x[:, 0], original["x"].float()) and torch.equal(y, original["y"].long())
    assert torch.equal(dm.val_set.tensors[2], original["prob"].float())


def test_underlying_is_accepted_as_prob_and_prob_is_optional(tmp_path):
    with_underlying = tmp_path / "u.csv"
    with_underlying.write_text("x,underlying,y\n-0.5,0.1,0\n0.5,0.9,1\n")
    x, y, prob = load_dnnex_csv(str(with_underlying))
    assert prob.tolist() == pytest.approx([0.1, 0.9]) and y.tolist() == [0.0, 1.0]
    without = tmp_path / "n.csv"
    without.write_text("y,x\n1,0.25\n0,0.75\n")
    dm = DnnexDataModule(csv_path=str(without))
    dm.setup()
    assert dm.train_set.tensors[0][:, 0].tolist() == [0.25, 0.75]
    assert len(dm.val_set.tensors) == 2  # no prob: nothing to compare the curve with


BAD_CSVS = {
    "missing file": (None, "no such file"),
    "empty": ("", "empty"),
    "header only": ("x,y,prob\n", "no data rows"),
    "missing column": ("x,prob\n0.1,0.5\n", "missing column 'y'"),
    "not a number": ("x,y\n0.1,1\nabc,0\n", "line 3, column 'x': 'abc' is not a number"),
    "not finite": ("x,y\n0.1,1\nnan,0\n", "line 3, column 'x': 'nan' is not a finite number"),
    "y outside 0/1": ("x,y\n0.1,1\n0.2,2\n", "line 3, column 'y': '2' must be 0 or 1"),
    "prob outside [0, 1]": ("x,y,prob\n0.1,1,1.5\n", "line 2, column 'prob': '1.5' is not in [0, 1]"),
    "short row": ("x,y\n0.1,1\n0.2\n", "line 3: 1 fields, the header has 2"),
}


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_bad_csv_is_one_error_naming_file_and_place(tmp_path, case):
    content, expected = BAD_CSVS[case]
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataFileError) as err:
        load_dnnex_csv(str(path))
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_bad_csv_through_the_cli_is_one_line_and_no_traceback(main, tmp_path):
    (tmp_path / "bad.csv").write_text("x,y\n0.1,1\n0.2,7\n")
    result = main("fit", "--config", str(REPO / "configs" / "dnnex.yaml"), "--data.init_args.csv_path", "bad.csv")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "bad.csv line 3, column 'y': '7' must be 0 or 1" in error[0]


def test_csv_from_a_url(http_dir):
    (http_dir.directory / "d.csv").write_text("x,y,prob\n-1,0,0.01\n0,1,0.99\n1,1,0.5\n")
    x, y, prob = load_dnnex_csv(f"{http_dir.url}/d.csv")
    assert x.tolist() == [-1, 0, 1] and y.tolist() == [0, 1, 1] and prob.tolist() == pytest.approx([0.01, 0.99, 0.5])
    with pytest.raises(DataFileError, match="could not download"):
        load_dnnex_csv(f"{http_dir.url}/missing.csv")


def test_val_prob_mae_is_the_mean_gap_between_predicted_and_true_prob():
    dm = DnnexDataModule(n_samples=200, seed=0)
    model = MLPClassifier(in_features=1, num_classes=2, depth=2, width=2, activation="relu")
    logger = MemoryLogger()
    trainer = quiet_trainer(max_epochs=3, logger=logger, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(model, datamodule=dm)
    logged = logger.metrics["val/prob_mae"][-1][1]
    x, _, prob = dm.val_set.tensors
    with torch.no_grad():
        expected = (model.predict_proba(x) - prob).abs().mean().item()
    assert logged == pytest.approx(expected, rel=1e-5)
    assert 0 < logged < 1
