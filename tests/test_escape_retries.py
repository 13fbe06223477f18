"""PlateauEscape's second tries: a re-placement that did harm gets new units once every other action
is spent, a few times in all, each judged from where the run went back to; one that only brought
nothing goes on; kicks undone come back where the loss is back at their stall, or where the run then
crawls; a stall reported on a spike does not roll back the re-placement that brought a gain."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from src.callbacks import PlateauDetector, PlateauEscape
from src.callbacks.escape_policy import KEPT_STEPS, PATIENT_REPEATS
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import StopAfter, quiet_trainer
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


def test_after_a_harmful_re_placement_is_rolled_back_the_units_pinned_before_it_are_re_placed_anew(tmp_path):
    """The stall that finds the harm was judged on the harmed weights, where the re-placed units are
    live: the units to re-place again are found on the weights rolled back to, where they are pinned."""
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"replace_units": True, "repeat": True}])
    trainer = quiet_trainer(max_epochs=15, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    model = EveryNewUnitHurts(depth=3, width=4, activation="sigmoid")  # stalls at epochs 3, 7, 11: each judged
    with torch.no_grad():
        model.net.layers[0].bias[1:3] = 30.0  # units 1 and 2 pinned at 1 on every input
    trainer.fit(model, datamodule=Toy2DDataModule())
    replaced = [a.action for e in detector.events for a in e.actions if a.action.startswith("re-place")]
    assert detector.events[1].actions[0].action.startswith("train/loss stalls at")  # the harm, rolled back
    assert replaced == ["re-place idle units: net.layers.0 [1, 2]"] * 3


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


class OutOnlyUnderTheSteps(MLPClassifier):
    """A scripted loss with the real gradients: 0.7 (a stall), 0.3 while ``escape``'s layer-wise steps are
    in force, and 0.7 again once they are undone: the steps, not the weights, hold the run out."""

    escape: PlateauEscape

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        return logits, loss - loss.detach() + (0.3 if self.escape.trust_ratio is not None else 0.7)


class FirstLayerSteps(L.Callback):
    """Each step's |d[W, b]| / |[W, b]| of the model's first Linear layer, by epoch."""

    def __init__(self):
        self.ratios: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.before = torch.cat([p.detach().flatten().clone() for p in pl_module.net.layers[0].parameters()])

    def on_train_batch_end(self, trainer, pl_module, *args):
        after = torch.cat([p.detach().flatten() for p in pl_module.net.layers[0].parameters()])
        self.ratios.append((trainer.current_epoch, float((after - self.before).norm() / self.before.norm())))


def test_layer_wise_steps_whose_undo_took_the_run_back_to_its_stall_stay_larger(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=2, min_delta=0.5)  # a scripted stall every 2 epochs
    escape, steps = PlateauEscape(actions=[{"trust_ratio": 0.01}], restore_lr_below=0.5), FirstLayerSteps()
    model = OutOnlyUnderTheSteps(depth=3)
    model.escape = escape
    trainer = quiet_trainer(
        max_epochs=6, limit_val_batches=0, callbacks=[detector, escape, steps], default_root_dir=tmp_path
    )  # to the next stall (epoch 5): its action is the steps again
    trainer.fit(model, datamodule=Toy2DDataModule())
    (on_at, on), (off_at, off), (back_at, back) = [(a.epoch, a.action) for a in detector.events[0].actions]
    assert on == "layer-wise steps of 0.01 x |W|" and off.startswith("layer-wise steps off (out of the stall")
    stay = f"they stay in force, steps of {0.01 * KEPT_STEPS:g} x |W|"
    assert back == f"train/loss back at 0.7: rolled back to epoch {off_at}, before 'layer-wise steps off'; {stay}"
    assert escape.keep_kicks and KEPT_STEPS > 1
    # each step's ratio, measured on the weights: 0.01 until the undo, KEPT_STEPS x that from the rollback on
    under = [r for epoch, r in steps.ratios if on_at < epoch <= off_at]
    kept = [r for epoch, r in steps.ratios if epoch > back_at]
    assert under and kept and [e.epoch for e in detector.events] == [on_at, 5]
    assert under == pytest.approx([0.01] * len(under), rel=1e-3)
    assert kept == pytest.approx([0.01 * KEPT_STEPS] * len(kept), rel=1e-3)
    assert escape.state_dict()["first"] == pytest.approx(0.7)


def fit_kept(epochs, root, ckpt_path=None, callbacks=()):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=2, min_delta=0.5)
    escape = PlateauEscape(actions=[{"trust_ratio": 0.01}], restore_lr_below=0.5)
    model = OutOnlyUnderTheSteps(depth=3)
    model.escape = escape
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, callbacks=[detector, escape, *callbacks], default_root_dir=root,
        enable_checkpointing=bool(callbacks),
    )  # fmt: skip
    trainer.fit(model, datamodule=Toy2DDataModule(), ckpt_path=ckpt_path)
    return model, escape


def test_a_run_resumed_with_the_larger_steps_kept_continues_as_an_uninterrupted_one(tmp_path):
    straight, straight_escape = fit_kept(9, tmp_path / "a")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, first = fit_kept(5, tmp_path / "b", callbacks=[checkpoint])
    assert first.keep_kicks and first.trust_ratio == pytest.approx(0.01 * KEPT_STEPS)  # stopped with them in force
    resumed, resumed_escape = fit_kept(9, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed_escape.history == straight_escape.history and len(straight_escape.history) > 3
    assert resumed_escape.state_dict()["first"] == straight_escape.state_dict()["first"] == pytest.approx(0.7)
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)


class CrawlsWithoutTheRaise(MLPClassifier):
    """A scripted loss, one step an epoch: 0.7 until the lr is first raised above its 0.1; then x0.7
    a step while it is raised, x0.999 while it is not (a crawl: never a stall). Kept in the model's
    state, so that a resumed run goes on from where it stopped."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("level", torch.tensor(0.7, dtype=torch.float64))
        self.register_buffer("kicked", torch.tensor(False))

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        raised = self.trainer.optimizers[0].param_groups[0]["lr"] > 0.15
        self.kicked |= raised
        if self.kicked:
            self.level *= 0.7 if raised else 0.999
        return logits, loss * 0.0 + self.level.float()


def fit_crawl(epochs, root, ckpt_path=None, callbacks=(), **kwargs):
    L.seed_everything(0, verbose=False)
    # epoch checks only: a step check's value is the mean of its window, which lags a scripted fall of x0.7 a step
    detector, escape = PlateauDetector(patience=3, step_window=None), PlateauEscape(actions=[{"lr_factor": 5}])
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, callbacks=[detector, escape, *callbacks], default_root_dir=root,
        **kwargs,
    )  # fmt: skip
    trainer.fit(CrawlsWithoutTheRaise(depth=2), datamodule=Toy2DDataModule(), ckpt_path=ckpt_path)
    return trainer, detector, escape


def test_kicks_undone_come_back_where_the_run_then_crawls(tmp_path):
    trainer, detector, escape = fit_crawl(14, tmp_path)
    assert len(detector.events) == 1  # the crawl is never a stall
    actions = [(a.epoch, a.action.split(" (")[0].split(" fell ")[0]) for a in detector.events[0].actions]
    # in force for 2 steps (0.7 -> 0.343), undone; 2 steps later the loss has fallen 0.0007 of that 0.357
    # (under a tenth): the raise comes back, and is undone again once the loss has halved, and so on
    crawl, undo = "train/loss", "lr restored"
    assert actions == [(3, "lr x5"), (5, undo), (7, crawl), (9, undo), (11, crawl), (13, undo)], actions
    back = detector.events[0].actions[2]
    fell = "train/loss fell 0.000686 in 2 steps without the kicks (0.357 with them)"
    assert back.action == f"{fell}: 'lr restored' undone"
    assert back.lr == [pytest.approx(0.5)]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1) and escape.lr_scale == 1.0


def test_a_resumed_run_brings_the_kicks_back_as_an_uninterrupted_one(tmp_path):
    _, _, straight = fit_crawl(9, tmp_path / "a")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, _, first = fit_crawl(9, tmp_path / "b", callbacks=[checkpoint, StopAfter(4)], enable_checkpointing=True)
    assert [a.action for a in first.history] == ["lr x5"]  # stopped with the raise in force, not yet undone
    _, _, resumed = fit_crawl(9, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.history == straight.history and len(straight.history) == 3


class SpikesAfterTheReplacement(EveryNewUnitHurts):
    """A scripted stall at 0.5 that a re-placement (lr 0: only the escape moves the weights) takes
    to 0.3, with a spike to 0.9 every fourth epoch: the next stall is reported on one. ``rises``: the
    loss is 0.9 from epoch 6 on instead, and stays there."""

    rises = False

    def _logits_and_loss(self, batch):
        logits, loss = Stuck._logits_and_loss(self, batch)
        changed = any(not torch.equal(p, q) for p, q in zip(self.parameters(), self.start, strict=True))
        high = self.current_epoch >= 6 if self.rises else self.current_epoch % 4 == 3
        return logits, loss * 0.0 + ((0.9 if high else 0.3) if changed else 0.5)


def test_a_stall_reported_on_a_spike_does_not_roll_back_the_re_placement_that_brought_a_gain(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3, step_window=None)  # epoch checks: the stall's value is the spike
    escape = PlateauEscape(actions=[{"recycle": True}, {"momentum": 0.5}])
    trainer = quiet_trainer(max_epochs=11, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    model = SpikesAfterTheReplacement(depth=3)
    trainer.fit(model, datamodule=Toy2DDataModule())  # the second re-placement has its 3 epochs to be judged
    assert [(e.epoch, round(e.value, 2)) for e in detector.events] == [(3, 0.5), (7, 0.9)]
    # the run sits at 0.3 (the median of its last checks), not at the 0.9 the stall was reported on: no harm, and a
    # gain, so the re-placement is not rolled back and goes first again (not momentum 0.5)
    actions = [a.action.split(":")[0] for e in detector.events for a in e.actions]
    assert actions == ["re-place each layer's weakest unit"] * 2, actions
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), model.start, strict=True))


def test_a_loss_that_rose_after_a_re_placement_and_stays_up_is_harm(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3, step_window=None)
    escape = PlateauEscape(actions=[{"recycle": True}, {"momentum": 0.5}])
    trainer = quiet_trainer(max_epochs=8, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    model = SpikesAfterTheReplacement(depth=3)
    model.rises = True
    trainer.fit(model, datamodule=Toy2DDataModule())
    # 0.3 at epochs 4-5, 0.9 at 6-7: the median of the checks since, 0.6, is above the 0.5 before it
    why = detector.events[1].actions[0].action
    assert why.startswith("train/loss stalls at 0.6, above 0.5 before the re-placement: rolled back to epoch 3"), why
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model.start, strict=True))
