"""PlateauEscape's probation: an action that brought nothing is not tried again at the same stall,
from any list; a gain is one on the stall's value, a re-placement's too, and a re-placement that
leaves the run stalled above that value is rolled back."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from src.callbacks import EscapeAction, PlateauDetector, PlateauEscape
from src.callbacks.escape_actions import changes_nothing
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import quiet_trainer
from tests.test_escape import weights


class Stuck(MLPClassifier):
    """A scripted stall: with lr 0 the loss never moves, whatever the escape does to momentum."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_an_action_withdrawn_for_no_gain_is_passed_over_in_the_next_list(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(
        actions={"unclear": [{"momentum": 0.9}, {"momentum": 0.5}], "any": [{"momentum": 0.9}, {"momentum": 0.8}]}
    )
    trainer = quiet_trainer(max_epochs=20, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(Stuck(depth=3), datamodule=Toy2DDataModule())
    assert all(e.diagnosis == "unclear" for e in detector.events)  # lr 0: the gradients tell nothing
    actions = [a.action for e in detector.events for a in e.actions]
    tried = [a for a in actions if not a.startswith("no gain on probation")]
    # momentum 0.9 brought nothing from the first list: the second list's momentum 0.9 is passed over
    assert tried == ["momentum 0.9", "momentum 0.5", "momentum 0.8", "none: every escape action is spent"], actions
    assert escape.spent == 3 and escape.withdrawn == ["momentum 0.9", "momentum 0.5", "momentum 0.8"]
    assert escape.spent_by == {"unclear": 2, "any": 2} and escape.next_action("unclear") is None


def test_a_re_placement_that_found_units_may_come_again_from_another_list(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    recycle = {"recycle": True}
    escape = PlateauEscape(actions={"unclear": [recycle], "any": [recycle, {"momentum": 0.8}]})
    trainer = quiet_trainer(max_epochs=15, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(Stuck(depth=3, activation="tanh"), datamodule=Toy2DDataModule())  # stalls at epochs 3, 7, 11, 14
    actions = [a.action for e in detector.events for a in e.actions if not a.action.startswith(("no gain", "none"))]
    # new units each time: the loss did not move (lr 0), yet the next list's re-placement is not passed over
    assert [a.split(":")[0] for a in actions] == ["re-place each layer's weakest unit"] * 2 + ["momentum 0.8"], actions
    assert escape.withdrawn == ["momentum 0.8"]  # no re-placement withdrawn: each found units


class StuckWithMomentum(MLPClassifier):
    """A scripted stall whose optimizer already has momentum 0.9."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0, momentum=0.9)


def test_an_action_whose_settings_already_hold_is_passed_over(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"momentum": 0.9}, {"momentum": 0.5}, {"momentum": 0.9, "nesterov": True}])
    trainer = quiet_trainer(max_epochs=10, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(StuckWithMomentum(depth=3), datamodule=Toy2DDataModule())  # stalls at epochs 3, 6, 9
    actions = [a.action for e in detector.events for a in e.actions if not a.action.startswith(("no gain", "none"))]
    # momentum 0.9 is what the run has: the first stall gets momentum 0.5 (withdrawn for no gain:
    # back to 0.9), the second nesterov, which 0.9 alone lacks
    assert actions == ["momentum 0.5", "momentum 0.9, nesterov on"], actions
    assert escape.spent_by == {"any": 3} and escape.withdrawn == ["momentum 0.5", "momentum 0.9, nesterov on"]


def test_changes_nothing_reads_every_group_of_every_optimizer():
    def sgd(*momenta):
        return torch.optim.SGD(
            [{"params": [torch.nn.Parameter(torch.zeros(1))], "momentum": m} for m in momenta], lr=0.1
        )

    momentum = EscapeAction(momentum=0.9)
    assert changes_nothing(momentum, [sgd(0.9)]) and changes_nothing(momentum, [sgd(0.9, 0.9), sgd(0.9)])
    assert not changes_nothing(momentum, [sgd(0.9, 0.0)]) and not changes_nothing(momentum, [sgd(0.9), sgd(0.5)])
    for acts in ({"lr_factor": 1.0}, {"trust_ratio": 0.01}, {"recycle": True}, {"replace_units": True}):
        assert not changes_nothing(EscapeAction(momentum=0.9, **acts), [sgd(0.9)])  # these act on every stall
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], eps=1e-8)
    assert changes_nothing(EscapeAction(eps=1e-8), [adam]) and not changes_nothing(EscapeAction(eps=1e-16), [adam])


def judged(escape: PlateauEscape, snapshot: dict, value: float) -> tuple[str | None, bool]:
    """``escape``'s verdict at a stall at ``value`` on the action that ``snapshot`` was taken for."""
    escape._detector = SimpleNamespace(mode="min", monitor="train/loss")
    escape._snapshot = {"best": snapshot["value"], "action": "a", **snapshot}
    return escape._failed_why(value)


def test_a_re_placement_is_judged_on_the_stall_it_answered():
    escape = PlateauEscape(actions={"saturated_units": [{"replace_units": True}], "any": [{"momentum": 0.9}]})
    escape.spent_by = {"saturated_units": 1, "any": 1}
    # the new units raised the loss to 1.2 at the first check; it came back down to the stall's 0.8 only
    back_down = {"list": "saturated_units", "value": 0.8, "ref": 1.2, "best": 0.805, "replaced": True}
    assert judged(escape, back_down, 0.805) == ("no gain on probation (best 0.805 vs 0.8)", False)
    below = {**back_down, "best": 0.7}
    assert judged(escape, below, 0.75) == (None, False)
    # a re-placement that leaves the run stalled above the stall it answered did harm: rolled back
    assert judged(escape, {**back_down, "best": 0.9}, 0.9) == (
        "train/loss stalls at 0.9, above 0.8 before the re-placement",
        True,
    )
    # any other action there only brought no gain: its settings are withdrawn, its weights kept
    found_at = {"list": "any", "value": 0.8, "first": 1.4}  # the escape found the run at 1.4
    assert judged(escape, found_at, 0.9) == ("no gain on probation (best 0.8 vs 0.8)", False)
    assert judged(escape, found_at, 1.7) == ("train/loss rose to 1.7", True)  # twice as bad


def test_an_action_that_leaves_the_run_worse_than_where_the_escape_found_it_did_harm():
    escape = PlateauEscape(actions={"any": [{"momentum": 0.9}, {"momentum": 0.5}]})
    escape.spent_by = {"any": 1}
    found_at = {"list": "any", "value": 0.8, "first": 1.4}  # the escape found the run at 1.4; this stall: 0.8
    # under twice the stall it answered, but above where the run without the escape would sit: rolled back
    assert judged(escape, found_at, 1.5) == ("train/loss rose to 1.5, above the first stall's 1.4", True)
    assert judged(escape, found_at, 1.3) == ("no gain on probation (best 0.8 vs 0.8)", False)
    # the first action: any rise above its stall
    rose = "train/loss rose to 0.9, above the first stall's 0.8"
    assert judged(escape, {**found_at, "first": 0.8}, 0.9) == (rose, True)
    # where the run sits, not a spike it was reported on
    spiked = {**found_at, "recent": [0.81, 0.8, 1.5]}
    assert judged(escape, spiked, 1.5) == ("no gain on probation (best 0.8 vs 0.8)", False)


def test_a_gain_lets_the_actions_withdrawn_before_it_be_tried_again():
    escape = PlateauEscape(actions=[{"momentum": 0.9}, {"momentum": 0.5}])
    escape.withdrawn, escape.spent_by = ["momentum 0.9"], {"any": 2}
    assert judged(escape, {"list": "any", "value": 0.6}, 0.6)[0].startswith("no gain")
    assert escape.withdrawn == ["momentum 0.9"]  # _roll_back adds the one judged; nothing cleared
    assert judged(escape, {"list": "any", "value": 0.6, "best": 0.5}, 0.5) == (None, False)
    assert escape.withdrawn == []
    restored = PlateauEscape(actions=[{"momentum": 0.9}, {"momentum": 0.5}])
    escape.withdrawn, escape._snapshot = ["momentum 0.5"], None
    restored.load_state_dict(escape.state_dict())
    assert restored.withdrawn == ["momentum 0.5"] and restored.state_dict() == escape.state_dict()


class Crawling(MLPClassifier):
    """A scripted stall that an lr raise gets out of: lr 1e-9."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-9)


def test_the_action_that_got_the_run_out_of_its_last_stall_goes_first_at_the_next(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    raise_lr = {"lr_factor": 1e8, "max_lr": 0.5}  # a kick: the lr is back at 1e-9 once the loss halved
    escape = PlateauEscape(actions=[{"momentum": 0.5}, raise_lr, {"momentum": 0.8}])
    trainer = quiet_trainer(max_epochs=20, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(Crawling(depth=3, activation="relu"), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    tried = [a for a in actions if not a.startswith(("no gain", "lr restored"))]
    assert tried == ["momentum 0.5", "lr x1e+08 (max 0.5)", "lr x1e+08 (max 0.5)"], tried  # not momentum 0.8
    assert [round(e.value, 2) for e in detector.events] == [0.86, 0.86, 0.36]  # out of the first: 0.86 -> 0.36
    assert escape.spent_by == {"any": 2}  # the list as far spent as it was: momentum 0.8 comes next


def test_an_action_with_a_gain_on_probation_goes_first_at_the_next_stall():
    escape = PlateauEscape(actions=[{"momentum": 0.9}, {"momentum": 0.5}])
    assert judged(escape, {"list": "any", "value": 0.6, "best": 0.5, "action": "momentum 0.9"}, 0.5) == (None, False)
    assert escape.worked == ("any", "momentum 0.9")
    judged(escape, {"list": None, "value": 0.5, "best": 0.2, "action": "lr restored"}, 0.2)  # an undo: not an action
    assert escape.worked == ("any", "momentum 0.9")


def test_a_resumed_run_puts_the_action_that_got_it_out_first_as_an_uninterrupted_one(tmp_path):
    def fit(epochs, root, ckpt_path=None, **kwargs):
        L.seed_everything(0, verbose=False)
        escape = PlateauEscape(actions=[{"momentum": 0.5}, {"lr_factor": 1e8, "max_lr": 0.5}, {"momentum": 0.8}])
        callbacks = [PlateauDetector(patience=3), escape, *kwargs.pop("callbacks", [])]
        trainer = quiet_trainer(
            max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, default_root_dir=root, **kwargs
        )
        model = Crawling(depth=3, activation="relu")
        trainer.fit(model, datamodule=Toy2DDataModule(), ckpt_path=ckpt_path)
        return escape, model

    straight, straight_model = fit(20, tmp_path / "a")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_half, _ = fit(12, tmp_path / "b", enable_checkpointing=True, callbacks=[checkpoint])
    assert first_half.worked == ("any", "lr x1e+08 (max 0.5)")  # out of the stall, the next one not yet come
    resumed, resumed_model = fit(20, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.history == straight.history and resumed.history[-1].action == "lr x1e+08 (max 0.5)"
    assert torch.equal(weights(resumed_model), weights(straight_model))


class Noisy(MLPClassifier):
    """A scripted plateau on a noisy loss: 0.3467 and 0.3512 by turns (1.3% apart), whatever is done."""

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        return logits, loss * 0.0 + (0.3512 if self.current_epoch % 2 else 0.3467)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_stall_reported_on_a_noisy_high_is_no_gain_to_beat(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"momentum": 0.9}, {"momentum": 0.5}, {"momentum": 0.8}, {"momentum": 0.7}])
    trainer = quiet_trainer(max_epochs=16, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(Noisy(depth=3), datamodule=Toy2DDataModule())
    values = [round(e.value, 4) for e in detector.events]
    assert values == [0.3512, 0.3467, 0.3512, 0.3467, 0.3512]  # stalls at epochs 3, 6, 9, 12, 15
    verdicts = [a.action.split(" (")[0] for e in detector.events[2:] for a in e.actions[:1]]
    # the first action had no floor to be judged on: 0.3467 counted as a gain on 0.3512; from then on
    # each is judged on the floor (0.3467), also where its stall was reported on a high (0.3512)
    assert verdicts == ["no gain on probation"] * 3, [a.action for e in detector.events for a in e.actions]
    # the first one's momentum 0.9 stayed (its gain): with all spent, the run goes on with its own momentum
    spent = "none: every escape action is spent; the optimizer's own settings back"
    assert [e.actions[-1].action for e in detector.events][-1] == spent


class GainsUnderTheAction(Stuck):
    """A scripted stall (lr 0) whose loss is 10% lower while the escape's momentum 0.9 or layer-wise
    steps are in force: the action brings a gain, stays, and the next stall finds the list spent."""

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        if self._trainer is None:
            return logits, loss
        escape = next(c for c in self.trainer.callbacks if isinstance(c, PlateauEscape))
        in_force = self.trainer.optimizers[0].param_groups[0]["momentum"] == 0.9 or escape.trust_ratio is not None
        return logits, loss * (0.9 if in_force else 1.0)


@pytest.mark.parametrize("action", [{"momentum": 0.9}, {"trust_ratio": 0.01}])
def test_once_every_action_is_spent_the_run_goes_on_with_the_optimizers_own_settings(tmp_path, action):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[action])
    trainer = quiet_trainer(max_epochs=16, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(GainsUnderTheAction(depth=3), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    # nothing got the run out: it goes on as it would without the escape, and says so once
    spent = "none: every escape action is spent; the optimizer's own settings back"
    assert actions[-1] == spent and actions.count(spent) == 1 and detector.events[-1].actions == [], actions
    assert trainer.optimizers[0].param_groups[0]["momentum"] == 0.0 and escape.trust_ratio is None
    said = next(a for e in detector.events for a in e.actions if a.action == spent)
    assert said.momentum == [0.0]  # what the next step used


class OutUnderTinyEps(MLPClassifier):
    """A scripted stall under Adam (lr 0): from the first step with eps below 1e-12 on, the loss falls
    to 0.3, 0.09, 0.027, 0.0081 of itself, one epoch each, whatever eps is then."""

    kicked_at = None

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.0)

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        eps = self.trainer.optimizers[0].param_groups[0]["eps"] if self._trainer is not None else 1e-8
        self.kicked_at = self.current_epoch if self.kicked_at is None and eps < 1e-12 else self.kicked_at
        return logits, loss if self.kicked_at is None else loss * 0.3 ** min(self.current_epoch - self.kicked_at + 1, 4)


def test_eps_is_a_kick_put_back_once_the_run_is_out_of_the_stall(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=[{"eps": 1e-16}])
    trainer = quiet_trainer(max_epochs=9, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(OutUnderTinyEps(depth=3), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    assert len(actions) == 2 and actions[0] == "eps 1e-16" and actions[1].startswith("eps back (out of the stall: ")
    assert trainer.optimizers[0].param_groups[0]["eps"] == 1e-8 and escape.raised_at is None


class WorseUnderMomentum(MLPClassifier):
    """A scripted stall at 0.7 (the real gradients, SGD lr 0.1) that momentum 0.9 takes up to 0.8: above
    the stall, yet under twice it."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        momentum = self.trainer.optimizers[0].param_groups[0]["momentum"] if self._trainer is not None else 0.0
        return logits, loss - loss.detach() + (0.8 if momentum == 0.9 else 0.7)


def test_an_action_that_leaves_the_run_above_the_first_stall_is_rolled_back_weights_and_all(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3, step_window=None)
    escape = PlateauEscape(actions=[{"momentum": 0.9}, {"lr_factor": 2}])
    at_stall = []
    take_snapshot = escape._snapshot_now
    escape._snapshot_now = lambda trainer, module, *args, **kwargs: (
        at_stall.append(weights(module)) or take_snapshot(trainer, module, *args, **kwargs)
    )
    trainer = quiet_trainer(max_epochs=10, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    model = WorseUnderMomentum(depth=3)  # stalls at epochs 3, 6, 9: each action has its probation
    trainer.fit(model, datamodule=Toy2DDataModule())
    first, second = detector.events[:2]
    back, then = (a.action for a in second.actions)
    rose = "train/loss rose to 0.8, above the first stall's 0.7"
    assert back == f"{rose}: rolled back to epoch {first.epoch}, before 'momentum 0.9'"
    assert then == "lr x2" and trainer.optimizers[0].param_groups[0]["momentum"] == 0.0
    # the weights went back too: the next action's snapshot holds the ones the first action was taken on
    assert len(at_stall) == 2 and torch.equal(at_stall[0], at_stall[1])


def test_no_action_is_taken_that_the_fit_would_end_before_judging():
    """An action is judged at the next stall: ``patience`` checks on at the earliest, or a full step window."""
    from src.callbacks.escape_policy import too_late

    def late(step, total, batches=1, patience=100, window=101, at_epoch_end=True, val_every=None):
        detector = SimpleNamespace(
            tracker=SimpleNamespace(patience=patience, cooldown=0), watches_steps=window is not None,
            steps=SimpleNamespace(rule=SimpleNamespace(window=window)), check_on_train_epoch_end=at_epoch_end,
        )  # fmt: skip
        trainer = SimpleNamespace(
            estimated_stepping_batches=total, global_step=step, num_training_batches=batches, val_check_batch=val_every,
            accumulate_grad_batches=1, lightning_module=SimpleNamespace(automatic_optimization=True),
        )  # fmt: skip
        return too_late(trainer, detector)

    # a full batch, a step an epoch: the stall zoo's fits of 2000 epochs, patience 100
    assert late(1900, 2000) is None
    assert late(1901, 2000) == "none: 99 steps left, fewer than the 100 it takes to judge an action"
    # Fashion-MNIST at batch 100, 550 steps an epoch: patience 3 is 1650 steps, the step window's 500 come first
    assert late(5000, 5500, batches=550, patience=3, window=500) is None
    assert late(5001, 5500, batches=550, patience=3, window=500).startswith("none: 499 steps left")
    # a validation metric checked every 50 batches, no step rule
    assert late(950, 1000, batches=550, patience=1, window=None, at_epoch_end=False, val_every=50) is None
    assert late(951, 1000, batches=550, patience=1, window=None, at_epoch_end=False, val_every=50) is not None
    assert late(10**9, float("inf")) is None and late(10**9, -1) is None  # no end to come (Lightning's -1: a stream)


@pytest.mark.parametrize(("epochs", "acted"), [(6, False), (7, True)])
def test_a_stall_too_close_to_the_fits_end_gets_no_action(tmp_path, epochs, acted):
    L.seed_everything(0, verbose=False)
    detector, escape = PlateauDetector(patience=3), PlateauEscape(actions=[{"recycle": True}])
    model = Stuck(depth=3, activation="tanh")
    start = weights(model)
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=Toy2DDataModule())
    stall = detector.events[0]  # at epoch 3 (step 4): the next stall could come 3 steps on
    assert stall.epoch == 3 and len(detector.events) == 1
    if acted:  # its 3 steps before the fit's end
        assert stall.actions[0].action.startswith("re-place each layer's weakest unit") and escape.spent == 1
        assert not torch.equal(weights(model), start)
    else:  # left on at the end, nothing could roll it back
        assert [a.action for a in stall.actions] == ["none: 2 steps left, fewer than the 3 it takes to judge an action"]
        assert escape.spent == 0 and torch.equal(weights(model), start)


@pytest.mark.parametrize("end", [{"max_epochs": 12}, {"max_steps": 96, "max_epochs": -1}])
def test_under_manual_optimization_each_optimizers_step_counts(end):
    """A GAN steps two optimizers a batch: 12 epochs of 4 batches are 96 steps, where Lightning's estimate says 48."""
    from tests.test_grad_norm import TwoOptimizersStalled, loader

    detector = PlateauDetector(monitor="loss", patience=2, step_window=None)
    escape = PlateauEscape(actions=[{"momentum": m} for m in (0.9, 0.5, 0.7, 0.3, 0.6)])
    quiet_trainer(callbacks=[detector, escape], **end).fit(TwoOptimizersStalled(), loader())
    assert [(e.epoch, e.step) for e in detector.events] == [(2, 24), (4, 40), (6, 56), (8, 72), (10, 88)]
    assert [e.actions[-1].action for e in detector.events] == [
        "momentum 0.9", "momentum 0.5", "momentum 0.7", "momentum 0.3",
        "none: 8 steps left, fewer than the 16 it takes to judge an action",  # patience 2: 2 epochs of 8 steps
    ]  # fmt: skip


class WorseEachAction(MLPClassifier):
    """A scripted stall at 0.7 (the real gradients, SGD lr 0.1) that each action the escape applies takes 0.8%
    higher: never harm by the probation's 1%, but two of them leave the run 1.6% above where it was found."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        escape = next(c for c in self.trainer.callbacks if isinstance(c, PlateauEscape)) if self._trainer else None
        return logits, loss - loss.detach() + 0.7 * (1 + 0.008 * (escape.applied if escape else 0))


@pytest.mark.parametrize(("epochs", "why"), [(13, "none: every escape action is spent"), (11, "none: 1 steps left")])
def test_where_the_escape_stops_acting_with_the_run_worse_than_it_found_it_the_run_goes_back_there(epochs, why):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3, step_window=None)
    escape = PlateauEscape(actions=[{"momentum": 0.9}, {"lr_factor": 2}, {"momentum": 0.5}])
    at_stall = []
    take_snapshot = escape._snapshot_now
    escape._snapshot_now = lambda trainer, module, *args, **kwargs: (
        at_stall.append(weights(module)) or take_snapshot(trainer, module, *args, **kwargs)
    )
    went_back = escape._back_to_origin
    escape._back_to_origin = lambda trainer, module, *args: (
        went_back(trainer, module, *args) and bool(at_stall.append(weights(module)) or True)
    )  # the weights it left the run with
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[detector, escape])
    model = WorseEachAction(depth=3)  # stalls at epochs 3, 6, 9 (and 12)
    trainer.fit(model, datamodule=Toy2DDataModule())
    last = detector.events[-1].actions[-1].action
    found = 0.7 * (1 + 0.008 * escape.applied)  # the value of the stall where the escape stopped acting
    assert last.startswith(f"{why}")
    assert last.endswith(f"; back to epoch 3, before the first action, where the escape found the run "
                         f"(train/loss 0.7, now {found:.4g})")  # fmt: skip
    assert escape.applied == (3 if epochs == 13 else 2)
    assert len(at_stall) == escape.applied + 1 and torch.equal(at_stall[-1], at_stall[0])  # back to the first
    assert not torch.equal(at_stall[0], at_stall[-2])  # the weights had moved
    assert (
        trainer.optimizers[0].param_groups[0]["momentum"] == 0.0 and trainer.optimizers[0].param_groups[0]["lr"] == 0.1
    )
    assert escape.state_dict()["origin"] is None and escape.said_spent  # once: nothing more in this fit


def test_a_resumed_run_goes_back_to_where_the_escape_found_it_as_an_uninterrupted_one(tmp_path):
    from tests.helpers import StopAfter

    def fit(root, ckpt_path=None, callbacks=()):
        L.seed_everything(0, verbose=False)
        escape = PlateauEscape(actions=[{"momentum": 0.9}, {"lr_factor": 2}, {"momentum": 0.5}])
        trainer = quiet_trainer(
            max_epochs=15, limit_val_batches=0, callbacks=[PlateauDetector(patience=3, step_window=None), escape,
            *callbacks], default_root_dir=root, enable_checkpointing=bool(callbacks),
        )  # fmt: skip
        model = WorseEachAction(depth=3)
        trainer.fit(model, datamodule=Toy2DDataModule(), ckpt_path=ckpt_path)
        return escape, model

    straight, straight_model = fit(tmp_path / "a")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_half, _ = fit(tmp_path / "b", callbacks=[checkpoint, StopAfter(7)])  # two actions taken
    assert first_half.applied == 2 and first_half.state_dict()["origin"] is not None
    resumed, resumed_model = fit(tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.history == straight.history and "where the escape found the run" in resumed.history[-1].action
    assert torch.equal(weights(resumed_model), weights(straight_model))
