"""The "dnnex" 1-D logistic data: a bent probability curve that a 2-unit ReLU net can fit."""

from __future__ import annotations

import csv
import io
import math
import urllib.error
import urllib.request
from pathlib import Path

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from src.data.in_memory import InMemoryDataModule, InMemoryDataset

PROB_ALIASES = ("prob", "underlying")


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong, on one line."""


def dnnex_prob(x: torch.Tensor) -> torch.Tensor:
    """The true P(y=1 | x): ``sigmoid(15x + 5)`` for ``x < 0`` and ``sigmoid(-5x + 5)`` for ``x >= 0``."""
    return torch.where(x < 0, torch.sigmoid(15 * x + 5), torch.sigmoid(-5 * x + 5))


def make_dnnex(n_samples: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x = linspace(-1, 1, n)``, the true ``prob`` and ``y ~ Bernoulli(prob)``, as float32 ``(n,)`` tensors."""
    x = torch.linspace(-1, 1, n_samples, dtype=torch.float64)
    prob = dnnex_prob(x)
    y = torch.bernoulli(prob, generator=torch.Generator().manual_seed(seed))
    return x.float(), prob.float(), y.float()


def _read_text(source: str) -> str:
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                return response.read().decode("utf-8-sig")
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "reason", err)
            message = f"{source}: could not download ({reason}); check the URL, or give a local path"
            raise DataFileError(message) from None
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataFileError(f"{source}: no such file; data.csv_path must be a CSV file or an http(s) URL")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(f"{source}: cannot be read as a UTF-8 text file ({err})") from None


def load_dnnex_csv(source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Read ``x``, ``y`` and (when present) ``prob`` / ``underlying`` from a CSV file or http(s) URL.

    Raises ``DataFileError`` naming the file, line and column of the first problem.
    """
    reader = csv.reader(io.StringIO(_read_text(source)))
    header = [name.strip() for name in next(reader, [])]
    if not any(header):
        raise DataFileError(f"{source}: the file is empty; expected a header line with columns x, y[, prob]")
    missing = [name for name in ("x", "y") if name not in header]
    if missing:
        raise DataFileError(
            f"{source}: missing column {', '.join(map(repr, missing))} (found {', '.join(map(repr, header))}); "
            "the header needs x, y and optionally prob"
        )
    prob_name = next((name for name in PROB_ALIASES if name in header), None)
    wanted = {"x": header.index("x"), "y": header.index("y")}
    if prob_name is not None:
        wanted["prob"] = header.index(prob_name)
    columns: dict[str, list[float]] = {name: [] for name in wanted}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataFileError(f"{source} line {line}: {len(row)} fields, the header has {len(header)}")
        for name, index in wanted.items():
            label = prob_name if name == "prob" else name
            try:
                value = float(row[index])
            except ValueError:
                raise DataFileError(f"{source} line {line}, column {label!r}: {row[index]!r} is not a number") from None
            if not math.isfinite(value):
                raise DataFileError(f"{source} line {line}, column {label!r}: {row[index]!r} is not a finite number")
            if name == "y" and value not in (0.0, 1.0):
                raise DataFileError(f"{source} line {line}, column 'y': {row[index]!r} must be 0 or 1")
            if name == "prob" and not 0.0 <= value <= 1.0:
                raise DataFileError(f"{source} line {line}, column {label!r}: {row[index]!r} is not in [0, 1]")
            columns[name].append(value)
    if not columns["x"]:
        raise DataFileError(f"{source}: the header is there but no data rows follow")
    x, y = torch.tensor(columns["x"]), torch.tensor(columns["y"])
    prob = torch.tensor(columns["prob"]) if "prob" in columns else None
    return x, y, prob


class DnnexDataModule(InMemoryDataModule):
    """The dnnex data: ``x`` on a grid in [-1, 1], ``y ~ Bernoulli(prob(x))`` with a kinked ``prob``.

    Generated from ``seed`` (``n_samples`` points), or read from ``csv_path`` (a file or an http(s)
    URL with columns ``x``, ``y`` and optionally ``prob``, also accepted as ``underlying``).

    As in the source, the model is fitted on the whole grid. The validation and test sets are the
    same grid, with the true ``prob`` as a third tensor when it is known: the model then logs
    ``val/prob_mae``, the mean |predicted P(y=1) - prob| over the grid, i.e. how well the curve is
    recovered. Validation here measures that fit, not generalisation to unseen data.

    Args:
        csv_path: CSV file or URL to load; ``null`` generates the data instead.
        n_samples: Grid points to generate (ignored with ``csv_path``).
        seed: Seed of the Bernoulli draw (ignored with ``csv_path``).
        batch_size: Global batch size; ``null`` trains full batch, as the source does.
        num_workers: DataLoader workers.
    """

    in_features = 1
    num_classes = 2

    def __init__(
        self,
        csv_path: str | None = None,
        n_samples: PositiveInt = 2000,
        seed: int = 0,
        batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.csv_path = csv_path
        self.n_samples = n_samples
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.csv_path is None:
            x, prob, y = make_dnnex(self.n_samples, self.seed)
        else:
            x, y, prob = load_dnnex_csv(self.csv_path)
        features = x.unsqueeze(1)
        labels = y.long()
        self.train_set = InMemoryDataset(features, labels)
        evaluation = (features, labels) if prob is None else (features, labels, prob)
        self.val_set = InMemoryDataset(*evaluation)
        self.test_set = InMemoryDataset(*evaluation)
