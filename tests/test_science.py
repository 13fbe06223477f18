"""The source study's finding, as a test: depth-7 sigmoid + plain SGD stalls at ln 2, ReLU learns."""

from __future__ import annotations

import lightning as L
import pytest

from src.data import Toy2DDataModule
from src.models import MLPClassifier

pytestmark = pytest.mark.slow  # 2000 epochs a seed


def final_train_loss(activation: str, seed: int, epochs: int = 1000) -> float:
    L.seed_everything(seed, verbose=False)
    model = MLPClassifier(in_features=2, num_classes=2, depth=7, width=10, activation=activation)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=Toy2DDataModule(seed=seed))
    return trainer.callback_metrics["train/loss"].item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_depth7_sigmoid_sgd_stalls_where_relu_learns(seed):
    assert final_train_loss("sigmoid", seed) > 0.6
    assert final_train_loss("relu", seed) < 0.1
