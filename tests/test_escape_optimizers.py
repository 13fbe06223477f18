"""PlateauEscape with any optimizer and beside other callbacks: the default policy adapts, a raise keeps its cap."""

from __future__ import annotations

import pytest
import torch

from src.callbacks import EscapeAction, PlateauDetector, PlateauEscape
from src.callbacks.escape_actions import apply_action
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import quiet_trainer
from tests.test_escape import sgd


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_the_default_policy_serves_any_standard_optimizer(tmp_path, optimizer):
    class Stalled(MLPClassifier):
        def configure_optimizers(self):
            return getattr(torch.optim, optimizer)(self.parameters(), lr=1e-12)  # no step moves it: stalls

    escape = PlateauEscape()
    detector = PlateauDetector(patience=2)
    trainer = quiet_trainer(max_epochs=12, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(Stalled(depth=3, width=4), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    assert len(actions) >= 3 and not any("needs" in a for a in actions)
    has_momentum = "momentum" in trainer.optimizers[0].param_groups[0]
    assert any(a.startswith("momentum") for a in actions) is has_momentum  # RMSprop has one, Adam not
    assert len(escape._configured["any"]) == 5 and len(escape.actions["any"]) == (5 if has_momentum else 3)


def test_an_lr_raise_never_lowers_an_lr_above_its_cap():
    for lr, expected in ((1.0, 1.0), (0.3, 0.5), (0.05, 0.25)):
        optimizer = sgd(lr=lr)
        settings = apply_action(optimizer, EscapeAction(lr_factor=5, max_lr=0.5))
        assert settings["lr"] == [pytest.approx(expected)]


def test_the_escape_acts_when_a_real_early_stopping_follows_the_detector(tmp_path):
    """The detector moves itself after a real EarlyStopping at setup; the callback after it (here the
    escape) must still be set up: a list changed while Lightning loops over it skipped it."""
    from lightning.pytorch.callbacks import EarlyStopping

    class Frozen(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    detector, escape = PlateauDetector(patience=2), PlateauEscape(actions=[{"lr_factor": 2}])
    stop = EarlyStopping("train/loss", patience=1000)
    trainer = quiet_trainer(max_epochs=6, limit_val_batches=0, callbacks=[detector, escape, stop])
    trainer.fit(Frozen(depth=2, width=4), datamodule=Toy2DDataModule())
    assert trainer.early_stopping_callback is stop
    assert detector.events and detector.events[0].actions[0].action == "lr x2"
