"""Small 2-D classification problems, generated from a seed."""

from __future__ import annotations

from typing import Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from src.data.in_memory import InMemoryDataModule, InMemoryDataset

Variant = Literal["two_clusters", "xor", "xor4", "blobs"]

# (center, label) of each Gaussian cluster. two_clusters is the source experiment's data set.
CLUSTERS: dict[str, list[tuple[tuple[float, float], int]]] = {
    "two_clusters": [((0.0, 8.0), 1), ((8.0, 0.0), 0)],
    "xor": [((0.0, 0.0), 0), ((8.0, 8.0), 0), ((0.0, 8.0), 1), ((8.0, 0.0), 1)],
    "xor4": [((0.0, 0.0), 0), ((0.0, 1.0), 1), ((1.0, 0.0), 1), ((1.0, 1.0), 0)],  # the lab's exact points
    "blobs": [((-10.0, -4.0), 0), ((-7.0, -8.0), 1), ((-6.0, -3.0), 2), ((-2.0, 4.0), 3)],
}
STD = {"two_clusters": 1.0, "xor": 1.0, "xor4": 0.0, "blobs": 0.5}


def make_toy2d(variant: str, n_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_samples`` points split evenly over the variant's clusters: features (N, 2), labels (N,)."""
    if variant not in CLUSTERS:
        raise ValueError(f"data.variant must be one of {', '.join(CLUSTERS)}, got {variant!r}")
    clusters = CLUSTERS[variant]
    if n_samples < len(clusters):
        raise ValueError(f"{variant} has {len(clusters)} clusters: n_samples must be >= {len(clusters)}")
    counts = [n_samples // len(clusters) + (i < n_samples % len(clusters)) for i in range(len(clusters))]
    xs, ys = [], []
    for (center, label), count in zip(clusters, counts, strict=True):
        xs.append(torch.tensor(center) + STD[variant] * torch.randn(count, 2, generator=generator))
        ys.append(torch.full((count,), label, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


class Toy2DDataModule(InMemoryDataModule):
    """Gaussian clusters in 2-D: the data set on which deep sigmoid MLPs stall.

    Variants: ``two_clusters`` (class 1 around (0, 8), class 0 around (8, 0), std 1: the source
    experiment), ``xor`` (four clusters, opposite corners share a class), ``xor4`` (the source lab's
    exact XOR: the points (0,0), (0,1), (1,0), (1,1) with labels 0, 1, 1, 0 and no noise; with
    ``n_samples: 4`` each point once, and validation and test are the same four) and ``blobs`` (four
    classes around (-10,-4), (-7,-8), (-6,-3), (-2,4), std 0.5). Train, validation and test sets
    are independent draws from one seeded generator, so the same ``seed`` gives the same data.

    Args:
        variant: Which problem to generate.
        n_samples: Training points, spread evenly over the clusters (the source used 20).
        val_samples: Validation points, drawn the same way; the test set has as many again.
        seed: Seed of the data generator (independent of the model's ``seed_everything``).
        batch_size: Global batch size; ``null`` trains full batch, as the source does.
        num_workers: DataLoader workers; 0 is fastest for data this small.
    """

    def __init__(
        self,
        variant: Variant = "two_clusters",
        n_samples: PositiveInt = 20,
        val_samples: PositiveInt = 20,
        seed: int = 0,
        batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if variant not in CLUSTERS:
            raise ValueError(f"data.variant must be one of {', '.join(CLUSTERS)}, got {variant!r}")
        self.variant = variant
        self.n_samples = n_samples
        self.val_samples = val_samples
        self.seed = seed
        self.in_features = 2
        self.num_classes = 1 + max(label for _, label in CLUSTERS[variant])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set = InMemoryDataset(*make_toy2d(self.variant, self.n_samples, generator))
        self.val_set = InMemoryDataset(*make_toy2d(self.variant, self.val_samples, generator))
        self.test_set = InMemoryDataset(*make_toy2d(self.variant, self.val_samples, generator))
