"""PlateauEscape: what each action does to the optimizer, then the whole policy in real runs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from src.callbacks import EscapeAction, GradNormMonitor, PlateauDetector, PlateauEscape
from src.callbacks.escape_actions import apply_action
from src.callbacks.events import EventKind, StallEvent, load_events
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import StopAfter, quiet_trainer


def sgd(lr: float = 0.1, momentum: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=lr, momentum=momentum)


def test_momentum_switch_changes_param_groups_in_place_and_clears_buffers():
    optimizer = sgd(momentum=0.5)
    param = optimizer.param_groups[0]["params"][0]
    param.grad = torch.ones(3)
    optimizer.step()
    assert "momentum_buffer" in optimizer.state[param]
    settings = apply_action(optimizer, EscapeAction(momentum=0.9, nesterov=True))
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"] is True
    assert "momentum_buffer" not in optimizer.state[param]
    assert settings == {"lr": [0.1], "momentum": [0.9]}


def test_compensated_momentum_keeps_the_effective_step():
    optimizer = sgd(lr=0.1, momentum=0.0)
    apply_action(optimizer, EscapeAction(momentum=0.99, compensate_lr=True))
    group = optimizer.param_groups[0]
    assert group["lr"] / (1 - group["momentum"]) == pytest.approx(0.1)


def test_lr_raise_is_capped_and_survives_schedulers_that_recompute_from_base_lrs():
    optimizer = sgd(lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    apply_action(optimizer, EscapeAction(lr_factor=100, max_lr=5.0), [scheduler])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5.0)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5)


@pytest.mark.parametrize("kind", ["OneCycleLR", "CyclicLR"])
def test_lr_raise_and_momentum_survive_schedulers_that_recompute_both_every_step(kind):
    # Both recompute lr and momentum at every step from their own bounds: the action must move those.
    def make():
        optimizer = sgd(lr=0.1, momentum=0.5)
        if kind == "OneCycleLR":
            return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=100)
        return optimizer, torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=10)

    (plain, plain_scheduler), (kicked, kicked_scheduler) = make(), make()
    for _ in range(5):
        for optimizer, scheduler in ((plain, plain_scheduler), (kicked, kicked_scheduler)):
            optimizer.step()
            scheduler.step()
    apply_action(kicked, EscapeAction(lr_factor=5, momentum=0.9), [kicked_scheduler])
    for _ in range(40):  # through the warm-up's top and into the decay
        for optimizer, scheduler in ((plain, plain_scheduler), (kicked, kicked_scheduler)):
            optimizer.step()
            scheduler.step()
        assert kicked.param_groups[0]["lr"] == pytest.approx(5 * plain.param_groups[0]["lr"])
        assert kicked.param_groups[0]["momentum"] == 0.9


def fake_trainer(optimizer, scheduler, events):
    stalls = [event for event in events if event.kind is EventKind.STALL]
    detector = SimpleNamespace(events=events, mode="min", save_events=lambda trainer: None, last_stall=stalls[-1])
    detector.tracker = SimpleNamespace(diverged=lambda value: False)  # the escape asks it at every check
    trainer = SimpleNamespace(
        optimizers=[optimizer], lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)], loggers=[],
        current_epoch=7, global_step=7, is_global_zero=True, estimated_stepping_batches=math.inf,
    )  # fmt: skip
    return trainer, detector


@pytest.mark.parametrize("restore_lr_below", [0.5, None])
def test_lr_raises_are_undone_once_the_run_is_out_of_the_stall(restore_lr_below):
    optimizer = sgd(lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    escape = PlateauEscape(
        actions=[{"momentum": 0.9}, {"lr_factor": 5, "max_lr": 0.5}, {"lr_factor": 2, "max_lr": 1.0}],
        restore_lr_below=restore_lr_below,
        rollback_on_divergence=False,
        probation=None,  # the raises add up: no action is rolled back for bringing nothing
    )
    events = [StallEvent(EventKind.STALL, epoch=e, step=e, monitor="train/loss", value=0.69) for e in (1, 2, 3)]
    trainer, escape._detector = fake_trainer(optimizer, scheduler, events)
    for event in events:
        escape.on_stall(trainer, None, event)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1.0) and group["momentum"] == 0.9
    escape.on_check(trainer, None, 0.5)  # better, but not yet half the stalled loss
    assert group["lr"] == pytest.approx(1.0)
    escape.on_check(trainer, None, 0.3)
    if restore_lr_below is None:
        assert group["lr"] == pytest.approx(1.0)
        return
    assert group["lr"] == pytest.approx(0.1) and scheduler.base_lrs == pytest.approx([0.1])
    assert group["momentum"] == 0.9  # momentum stays: only the lr kick is undone
    assert events[-1].actions[-1].action.startswith("lr restored") and escape.lr_scale == 1.0
    escape.on_check(trainer, None, 0.01)  # nothing left to undo
    assert group["lr"] == pytest.approx(0.1) and len(escape.history) == 4
    assert escape.state_dict()["lr_scale"] == 1.0


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"lr_factor": 0}, "lr_factor"),
        ({}, "must set"),
        ({"mommentum": 0.9}, "unknown action key"),
        ({"eps": 0.0}, "eps must be > 0, got 0.0"),
    ],
)
def test_malformed_actions_fail_at_construction(action, message):
    with pytest.raises(ValueError, match=message):
        PlateauEscape(actions=[action])
    with pytest.raises(ValueError, match="restore_lr_below"):
        PlateauEscape(restore_lr_below=1.5)
    with pytest.raises(ValueError, match=r"PlateauEscape: probation must be in \(0, 1\) or null, got 1.0"):
        PlateauEscape(probation=1.0)


class AdamClassifier(MLPClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


def test_a_momentum_action_of_the_users_on_adam_fails_at_fit_start(tmp_path):
    escape = PlateauEscape(actions=[{"momentum": 0.9}, {"lr_factor": 2}])
    trainer = quiet_trainer(max_epochs=1, callbacks=[PlateauDetector(), escape], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="needs an optimizer with 'momentum'.*Adam"):
        trainer.fit(AdamClassifier(), datamodule=Toy2DDataModule())


def test_escape_without_detector_fails_at_setup(tmp_path):
    trainer = quiet_trainer(max_epochs=1, callbacks=[PlateauEscape()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a PlateauDetector"):
        trainer.fit(MLPClassifier(), datamodule=Toy2DDataModule())


def escape_trainer(tmp_path, epochs: int, on_exhausted: str = "continue", **kwargs) -> L.Trainer:
    callbacks = [
        GradNormMonitor(),
        PlateauDetector(patience=100, good_enough=0.01),
        PlateauEscape(on_exhausted=on_exhausted),
        *kwargs.pop("callbacks", []),
    ]
    defaults = dict(limit_val_batches=0, log_every_n_steps=10, default_root_dir=tmp_path, deterministic=True)
    return quiet_trainer(max_epochs=epochs, callbacks=callbacks, **{**defaults, **kwargs})


@pytest.mark.slow
def test_default_policy_gets_the_stalled_sigmoid_net_out(tmp_path):
    L.seed_everything(0, verbose=False)
    trainer = escape_trainer(tmp_path, 800, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path))
    trainer.fit(MLPClassifier(depth=7, activation="sigmoid"), datamodule=Toy2DDataModule())
    assert trainer.callback_metrics["train/loss"] < 0.05
    events = load_events(tmp_path / "lightning_logs" / "version_0" / "stall_events.json")
    actions = [a.action for e in events for a in e.actions]
    # momentum 0.9 brings no 1% gain by the next stall: withdrawn, the next tried; each layer's weakest
    # unit re-placed with layer-wise steps gets the net out, and the steps are undone there
    tried = [a.split(":")[0] for a in actions if not a.startswith(("no gain", "layer-wise steps off"))]
    assert tried == ["momentum 0.9", "momentum 0.0, layer-wise steps of 0.01 x |W|, re-place each layer's weakest unit"]
    assert sum(a.startswith("no gain on probation") for a in actions) == 1
    escape = next(cb for cb in trainer.callbacks if isinstance(cb, PlateauEscape))
    assert actions[-1].startswith("layer-wise steps off (out of the stall: ") and escape.trust_ratio is None
    assert all(e.diagnosis == "flat" for e in events)
    assert trainer.optimizers[0].param_groups[0]["momentum"] == 0.0


class Stuck(MLPClassifier):
    """A scripted stall: with lr 0 the loss never moves, whatever the escape does to momentum or lr."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_exhausted_actions_stop_training_with_a_reason(tmp_path):
    L.seed_everything(0, verbose=False)
    actions = [{"momentum": 0.9}, {"momentum": 0.99}, {"lr_factor": 5, "max_lr": 0.5}]
    detector = PlateauDetector(patience=3)
    escape = PlateauEscape(actions=actions, on_exhausted="stop", probation=None)  # the actions add up
    trainer = quiet_trainer(
        max_epochs=500, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path
    )
    trainer.fit(Stuck(depth=3), datamodule=Toy2DDataModule())
    spent = [e.actions[0].action for e in detector.events[:-1]]
    flat_list = escape.actions["any"]
    assert spent == [action.describe() for action in flat_list] and escape.spent == len(flat_list)
    assert [a.action for a in detector.events[-1].actions] == ["stop: every escape action is spent"]
    assert trainer.current_epoch < 50 and trainer.should_stop


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_resume_after_an_action_continues_the_policy_and_matches_an_uninterrupted_run(tmp_path):
    L.seed_everything(0, verbose=False)
    straight = MLPClassifier(depth=7, activation="sigmoid")
    straight_trainer = escape_trainer(tmp_path / "a", 400)
    straight_trainer.fit(straight, datamodule=Toy2DDataModule())

    L.seed_everything(0, verbose=False)
    first_half = escape_trainer(
        tmp_path / "b", 400, enable_checkpointing=True,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), StopAfter(249)],
    )  # fmt: skip
    first_half.fit(MLPClassifier(depth=7, activation="sigmoid"), datamodule=Toy2DDataModule())
    escape = next(cb for cb in first_half.callbacks if isinstance(cb, PlateauEscape))
    assert escape.spent >= 1

    resumed_model = MLPClassifier(depth=7, activation="sigmoid")
    resumed = escape_trainer(tmp_path / "b", 400)
    resumed.fit(resumed_model, datamodule=Toy2DDataModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    resumed_escape = next(cb for cb in resumed.callbacks if isinstance(cb, PlateauEscape))
    straight_escape = next(cb for cb in straight_trainer.callbacks if isinstance(cb, PlateauEscape))
    assert resumed_escape.history == straight_escape.history and len(resumed_escape.history) > escape.spent
    assert torch.equal(weights(resumed_model), weights(straight))


def test_a_divergence_after_an_lr_raise_names_the_raise():
    optimizer = sgd(lr=0.1)
    escape = PlateauEscape(
        actions=[{"momentum": 0.9}, {"lr_factor": 5, "max_lr": 0.5}], rollback_on_divergence=False, probation=None
    )
    stalls = [StallEvent(EventKind.STALL, e, e, "train/loss", 0.69) for e in (1, 2)]
    trainer, escape._detector = fake_trainer(
        optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0), stalls
    )
    for event in stalls:
        escape.on_stall(trainer, None, event)
    divergence = StallEvent(EventKind.DIVERGENCE, 3, 3, "train/loss", float("nan"))
    escape.on_stall(trainer, None, divergence)
    assert divergence.actions[0].action == "none: diverged after 'lr x5 (max 0.5)' at epoch 2 (lr 0.5)"
    assert escape.spent == 2  # a divergence spends no action


class BlowsUpAboveLr(MLPClassifier):
    """A scripted divergence: the loss is NaN whenever the lr is above 0.15 (after a raise)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.optimizers[0].param_groups[0]["lr"] > 0.15 else loss


def test_a_divergence_after_an_action_rolls_back_to_before_it_and_goes_on(tmp_path):
    L.seed_everything(0, verbose=False)
    model = BlowsUpAboveLr(depth=3)
    detector = PlateauDetector(patience=2, min_delta=0.5)  # a scripted stall every 2 epochs
    escape = PlateauEscape(actions=[{"lr_factor": 5}, {"momentum": 0.9}])
    at_stall, after_rollback = [], []
    detector.add_listener(lambda t, m, e: at_stall.append(weights(m)) if not at_stall else None)  # before the raise

    class AfterCheck(L.Callback):  # the weights the epoch after the divergence starts from (no step yet)
        def on_train_epoch_start(self, trainer, pl_module):
            if detector.events[-1:] and detector.events[-1].kind == "divergence" and not after_rollback:
                after_rollback.append(weights(pl_module))

    trainer = quiet_trainer(max_epochs=12, limit_val_batches=0, callbacks=[detector, escape, AfterCheck()],
                            default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=Toy2DDataModule())
    stall, divergence = detector.events[0], detector.events[1]
    assert divergence.kind == "divergence" and divergence.recovered
    assert divergence.actions[0].action == f"diverged: rolled back to epoch {stall.epoch}, before 'lr x5'"
    assert torch.equal(after_rollback[0], at_stall[0])  # the weights from before the raise, exactly
    assert not detector.diverged and trainer.current_epoch == 12  # not stopped
    # a rollback leaves no remedy untried: the next stall gets the list's next action; once it has
    # brought nothing too (a scripted stall), the run says once that every action is spent
    later = [a.action for e in detector.events[2:] for a in e.actions]
    assert later[0] == "momentum 0.9" and later[1].startswith("no gain on probation (best ")
    assert "'momentum 0.9' withdrawn" in later[1]
    assert later[2:] == ["none: every escape action is spent"] and escape.next_action("flat") is None
    assert len(detector.events) > 4 and detector.events[-1].actions == []
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1 and escape.lr_scale == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


class WorseAboveLr(MLPClassifier):
    """A scripted bad remedy: while the lr is above 0.15 every logit is pushed up by 10, so half the
    points are wrong by a wide margin and the loss is several times chance (finite)."""

    def forward(self, x):
        shift = 10.0 if self._trainer is not None and self.trainer.optimizers[0].param_groups[0]["lr"] > 0.15 else 0
        return super().forward(x) + shift


def test_a_stall_at_a_worse_loss_after_an_action_rolls_back_and_tries_the_next_list(tmp_path):
    L.seed_everything(0, verbose=False)
    model = WorseAboveLr(depth=3)
    detector = PlateauDetector(patience=2, min_delta=0.5)  # a scripted stall every 2 epochs
    at_stall = []
    detector.add_listener(lambda t, m, e: at_stall.append(weights(m)) if not at_stall else None)
    escape = PlateauEscape(
        actions={"flat": [{"lr_factor": 5}], "unclear": [{"lr_factor": 5}], "any": [{"momentum": 0.9}]}
    )
    trainer = quiet_trainer(max_epochs=7, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=Toy2DDataModule())  # the action at epoch 4 has its 2 epochs of probation
    first, second = detector.events[:2]
    assert first.actions[0].action == "lr x5"
    rolled, then = (a.action for a in second.actions)
    assert rolled.startswith("train/loss rose to ") and rolled.endswith(
        f"rolled back to epoch {first.epoch}, before 'lr x5'"
    )
    assert then == "momentum 0.9" and escape.failed[0] == first.diagnosis
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1 and not second.recovered


class BlowsUpWhenTheRaiseIsUndone(MLPClassifier):
    """A scripted bad undo: the loss is NaN (or ``blown`` x itself) once the lr is back at 0.1 after a raise."""

    raised = False
    blown = float("nan")

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.raised = self.raised or self.trainer.optimizers[0].param_groups[0]["lr"] > 0.15
        return loss * self.blown if self.raised and self.trainer.optimizers[0].param_groups[0]["lr"] < 0.15 else loss


@pytest.mark.parametrize("blown", [float("nan"), 1000.0])  # a NaN, or a loss past divergence_threshold (2)
def test_a_divergence_after_the_kick_is_undone_rolls_back_to_the_undo_and_keeps_the_kick(tmp_path, blown):
    L.seed_everything(0, verbose=False)
    model, model.blown = BlowsUpWhenTheRaiseIsUndone(depth=3), blown
    detector = PlateauDetector(patience=2, min_delta=0.5, divergence_threshold=2.0)  # a stall every 2 epochs
    escape = PlateauEscape(actions=[{"lr_factor": 5}], restore_lr_below=0.99)  # out of it at a 1% drop
    at_undo = []
    take_snapshot = escape._snapshot_now
    escape._snapshot_now = lambda trainer, module, *args, **kwargs: (
        at_undo.append(weights(module)) or take_snapshot(trainer, module, *args, **kwargs)
    )
    after_rollback = []

    class AfterCheck(L.Callback):  # the weights the epoch after the divergence starts from (no step yet)
        def on_train_epoch_start(self, trainer, pl_module):
            if detector.events[-1:] and detector.events[-1].kind == "divergence" and not after_rollback:
                after_rollback.append(weights(pl_module))

    callbacks = [detector, escape, AfterCheck()]
    trainer = quiet_trainer(max_epochs=8, limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=Toy2DDataModule())
    undone = [a for e in detector.events for a in e.actions if a.action.startswith("lr restored")]
    divergence = next(e for e in detector.events if e.kind == "divergence")
    assert len(undone) == 1 and divergence.recovered and not detector.diverged and trainer.current_epoch == 8
    assert divergence.actions[0].action == (
        f"diverged: rolled back to epoch {undone[0].epoch}, before 'lr restored'; they stay in force"
    )
    assert escape.keep_kicks and escape.failed == []  # the raise itself was fine: its list stays usable
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5) and escape.lr_scale == pytest.approx(5)
    assert len(at_undo) == 2 and torch.equal(after_rollback[0], at_undo[1])  # the weights at the undo, exactly
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "keep_kicks" in escape.state_dict() and escape.state_dict()["keep_kicks"] is True


def test_validate_and_test_outside_a_fit_change_nothing_and_do_not_crash():
    """``validate``/``test`` after a fit, or on a fresh trainer, apply no action (EarlyStopping's guard)."""

    class NanValidation(MLPClassifier):
        def validation_step(self, batch, batch_idx):
            return super().validation_step((batch[0] * float("nan"), batch[1]), batch_idx)

    dm = Toy2DDataModule()
    detector = PlateauDetector(monitor="val/loss", patience=1, check_on_train_epoch_end=False)
    escape = PlateauEscape()
    trainer = quiet_trainer(max_epochs=2, callbacks=[GradNormMonitor(), detector, escape])
    model = NanValidation(depth=2, width=4)
    model.validation_step = MLPClassifier.validation_step.__get__(model)  # a finite fit
    trainer.fit(model, datamodule=dm)
    group = dict(trainer.optimizers[0].param_groups[0])
    del model.validation_step  # NaN from here on: a fit would call it a divergence
    for _ in range(3):
        trainer.validate(model, datamodule=dm, verbose=False)
    assert {k: trainer.optimizers[0].param_groups[0][k] for k in ("lr", "momentum")} == {
        k: group[k] for k in ("lr", "momentum")
    }
    assert not detector.events and escape.spent == 0
    fresh_detector, fresh_escape = PlateauDetector(), PlateauEscape()
    fresh = quiet_trainer(callbacks=[GradNormMonitor(), fresh_detector, fresh_escape])
    (validated,) = fresh.validate(model, datamodule=dm, verbose=False)
    (tested,) = fresh.test(model, datamodule=dm, verbose=False)
    assert math.isnan(validated["val/loss"]) and "test/loss" in tested  # ran, on the NaN validation step
    assert not fresh_detector.events and fresh_escape.spent == 0 and not fresh.should_stop
