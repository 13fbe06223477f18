"""PlateauEscape's second tries: a re-placement that did harm is tried again with new units, a few
times in a row, each judged from where the run went back to; layer-wise steps kept in force are
halved at each later stall, and a halving that blows the run up is undone for good."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from src.callbacks import PlateauDetector, PlateauEscape
from src.callbacks.escape_policy import PATIENT_REPEATS
from src.callbacks.escape_snapshot import KEPT_HALVINGS
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import quiet_trainer


class EveryNewUnitHurts(MLPClassifier):
    """A scripted stall (lr 0: only the escape moves the weights) where any change to the weights
    costs 1.0 of loss: every re-placement does harm, and its rollback undoes it exactly."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_fit_start(self):
        self.start = [p.detach().clone() for p in self.parameters()]

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        changed = any(not torch.equal(p, q) for p, q in zip(self.parameters(), self.start, strict=True))
        return logits, loss + float(changed)


def test_a_harmful_re_placement_is_tried_again_with_new_units_from_where_the_run_went_back(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"momentum": 0.5}, {"recycle": True, "repeat": True}])
    trainer = quiet_trainer(max_epochs=40, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    model = EveryNewUnitHurts(depth=3, activation="tanh")
    trainer.fit(model, datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    replaced = [a for a in actions if a.startswith("re-place each layer's weakest unit")]
    rolled_back = [a for a in actions if "before the re-placement: rolled back" in a]
    # the momentum comes first, brings nothing; then the re-placement, PATIENT_REPEATS times, each rolled back
    assert len(replaced) == PATIENT_REPEATS == len(rolled_back), actions
    assert actions[-1] == "none: every escape action is spent" and escape.failed == ["any"]
    # each one is judged from the stall value where the run went back to, not the harmed one (+1.0)
    at = detector.events[0].value
    assert all(f"above {at:.4g} before the re-placement" in a for a in rolled_back), rolled_back
    for p, q in zip(model.parameters(), model.start, strict=True):  # every harm undone
        assert torch.equal(p, q)


class StepsKept(L.Callback):
    """Puts the escape where undoing its layer-wise steps of 0.01 x |W| blew the run up once: they stay."""

    def __init__(self, escape: PlateauEscape) -> None:
        self.escape = escape

    def on_train_start(self, trainer, pl_module):
        self.escape.trust_ratio, self.escape.keep_kicks = 0.01, True


class Flat(MLPClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_steps_kept_in_force_are_halved_at_each_later_stall_then_the_policy_goes_on(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"momentum": 0.5}])
    callbacks = [detector, escape, StepsKept(escape)]
    trainer = quiet_trainer(max_epochs=20, limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(Flat(depth=3), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    halved = [f"layer-wise steps halved to {0.01 / 2**k:g} x |W|" for k in range(1, KEPT_HALVINGS + 1)]
    assert actions[: KEPT_HALVINGS + 1] == [*halved, "momentum 0.5"], actions
    assert escape.trust_ratio == pytest.approx(0.01 / 2**KEPT_HALVINGS) and escape.halvings == KEPT_HALVINGS
    restored = PlateauEscape(actions=[{"momentum": 0.5}])
    restored.load_state_dict(escape.state_dict())
    assert restored.halvings == KEPT_HALVINGS and restored.state_dict() == escape.state_dict()


class HurtBySmallerSteps(Flat):
    """Any layer-wise step below 0.01 x |W| costs 1.0 of loss (twice the stall's)."""

    escape: PlateauEscape

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        return logits, loss + float((self.escape.trust_ratio or 1.0) < 0.01)


def test_a_halving_that_blows_the_run_up_is_undone_and_not_tried_again(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"momentum": 0.5}])
    model = HurtBySmallerSteps(depth=3)
    model.escape = escape
    callbacks = [detector, escape, StepsKept(escape)]
    trainer = quiet_trainer(max_epochs=12, limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    assert actions[0] == "layer-wise steps halved to 0.005 x |W|", actions
    assert actions[1].startswith("train/loss rose to") and "before 'layer-wise steps halved" in actions[1]
    assert actions[2] == "momentum 0.5", actions  # no second halving
    assert escape.trust_ratio == 0.01 and escape.halvings == KEPT_HALVINGS


class Unmoved(MLPClassifier):
    """A scripted stall (lr 0) that a re-placement of the weakest units does not move either: ReDo's
    rule zeroes their outgoing weights, so the net computes what it did."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_re_placement_that_brings_nothing_but_finds_units_goes_on_past_its_probations(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"recycle": True, "repeat": True}])
    trainer = quiet_trainer(max_epochs=30, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(Unmoved(depth=3, activation="tanh"), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    withdrawn = [a for a in actions if a.startswith("no gain on probation")]
    replaced = [a for a in actions if a.startswith("re-place each layer's weakest unit")]
    # no harm (the loss stays), no gain: withdrawn after PATIENT_REPEATS probations, yet new units each time
    assert withdrawn and len(replaced) > PATIENT_REPEATS + 1 and escape.failed == [], actions
    assert "none: every escape action is spent" not in actions
