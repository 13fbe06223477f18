"""PlateauEscape's second tries: a re-placement that did harm gets new units once every other action
is spent, a few times in all, each judged from where the run went back to; one that only brought
nothing goes on; kicks undone come back where the loss is back at their stall."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from src.callbacks import PlateauDetector, PlateauEscape
from src.callbacks.escape_policy import PATIENT_REPEATS
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import quiet_trainer
from tests.test_escape_probation import Stuck


class EveryNewUnitHurts(Stuck):
    """A scripted stall (lr 0: only the escape moves the weights) where any change to the weights
    costs 1.0 of loss: every re-placement does harm, and its rollback undoes it exactly."""

    def on_fit_start(self):
        self.start = [p.detach().clone() for p in self.parameters()]

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        changed = any(not torch.equal(p, q) for p, q in zip(self.parameters(), self.start, strict=True))
        return logits, loss + float(changed)


def test_a_harmful_re_placement_gets_new_units_once_all_else_is_spent_from_where_the_run_went_back(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions={"unclear": [{"recycle": True, "repeat": True}], "any": [{"momentum": 0.5}]})
    trainer = quiet_trainer(max_epochs=40, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    model = EveryNewUnitHurts(depth=3)
    trainer.fit(model, datamodule=Toy2DDataModule())
    assert {e.diagnosis for e in detector.events} == {"unclear"}  # lr 0: the gradients tell nothing
    actions = [a.action.split(":")[0] for e in detector.events for a in e.actions]
    recycle, back = "re-place each layer's weakest unit", "train/loss stalls at"
    # the re-placement did harm: the other list's momentum first; it brings nothing, and then new
    # units, PATIENT_REPEATS re-placements in all, each rolled back
    assert actions[:4] == [recycle, actions[1], "momentum 0.5", actions[3]] and actions[1].startswith(back)
    assert actions[3].startswith("no gain") and actions.count(recycle) == PATIENT_REPEATS, actions
    assert sum(a.startswith(back) for a in actions) == PATIENT_REPEATS and actions[-1] == "none"
    assert escape.redraws == {"unclear": PATIENT_REPEATS} and escape.failed == ["unclear", "any"]
    # each one is judged from the stall value where the run went back to, not the harmed one (+1.0)
    at = f"above {detector.events[0].value:.4g} before the re-placement"
    assert all(at in a.action for e in detector.events for a in e.actions if a.action.startswith(back))
    for p, q in zip(model.parameters(), model.start, strict=True):  # every harm undone
        assert torch.equal(p, q)


def test_a_re_placement_that_brings_nothing_but_finds_units_goes_on_past_its_probations(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"recycle": True, "repeat": True}])
    trainer = quiet_trainer(max_epochs=30, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    # lr 0, and ReDo's rule zeroes the new units' outgoing weights: the net computes what it did
    trainer.fit(Stuck(depth=3, activation="tanh"), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    withdrawn = [a for a in actions if a.startswith("no gain on probation")]
    replaced = [a for a in actions if a.startswith("re-place each layer's weakest unit")]
    # no harm (the loss stays), no gain: withdrawn after PATIENT_REPEATS probations, yet new units each time
    assert withdrawn and len(replaced) > PATIENT_REPEATS + 1 and escape.failed == [], actions
    assert "none: every escape action is spent" not in actions


class BackAtTheStallWhenTheRaiseIsUndone(MLPClassifier):
    """A scripted loss: 0.7 (a stall), 0.3 while the lr is raised above 0.15, and 0.7 again once
    the raise is undone: the kick, not the weights, held the run out of the stall."""

    raised = False

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.raised = self.raised or lr > 0.15
        return logits, loss * 0.0 + (0.3 if lr > 0.15 else 0.7)


def test_kicks_undone_come_back_at_the_first_check_where_the_loss_is_back_at_their_stall(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=2, min_delta=0.5)  # a scripted stall every 2 epochs
    escape = PlateauEscape(actions=[{"lr_factor": 5}], restore_lr_below=0.5)
    trainer = quiet_trainer(max_epochs=10, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(BackAtTheStallWhenTheRaiseIsUndone(depth=2), datamodule=Toy2DDataModule())
    actions = [(a.epoch, a.action) for a in detector.events[0].actions]
    (raised_at, raised), (undone_at, undone), (back_at, back) = actions
    assert raised == "lr x5" and undone.startswith("lr restored (out of the stall: 0.3 vs 0.7)")
    # the first check after the undo sees 0.7: back to the undo, at once, not at a stall patience later
    assert back_at == undone_at + 1, actions
    assert back == f"train/loss back at 0.7: rolled back to epoch {undone_at}, before 'lr restored'; they stay in force"
    # the raise stays: later stalls are at 0.3 (the run out of the first), with the lr at 0.5
    assert all(e.value == pytest.approx(0.3) for e in detector.events[1:]) and escape.keep_kicks
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5)
