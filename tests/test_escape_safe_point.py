"""PlateauEscape's safe point: a run that got out of a stall and then diverges under the escape's
settings goes back to where it was out, with the optimizer's own settings (or, where undoing the
kicks blew it up, with the kicks), and with half the lr each time it diverges from there again."""

from __future__ import annotations

import copy
import os
import types
from pathlib import Path

import lightning as L
import pytest
import torch

from src.callbacks import PlateauDetector, PlateauEscape
from src.callbacks import escape_snapshot as snapshots
from src.callbacks.escape_policy import KEPT_STEPS
from src.callbacks.events import EventKind
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import StopAfter, quiet_trainer
from tests.test_escape_retries import OutOnlyUnderTheSteps


class Scripted(MLPClassifier):
    """The loss's value is scripted per epoch (1.0 flat to epoch 3, then out of the stall and
    falling, 100 where ``script`` says it diverges); its gradient is the net's real one, so the
    weights move every step."""

    def __init__(self, script: dict[int, float], **kwargs):
        super().__init__(**kwargs)
        self.script = script

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        value = self.script.get(self.current_epoch, 1.0 if self.current_epoch < 4 else 0.35 - 0.01 * self.current_epoch)
        return logits, loss - loss.detach() + value


class Weights(L.Callback):
    """The model's weights at each epoch's end, and at each epoch's start."""

    def __init__(self):
        self.at_end, self.at_start = {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_start[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())

    def on_train_epoch_end(self, trainer, pl_module):
        self.at_end[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())


def fit(
    script: dict[int, float],
    action: dict,
    epochs: int,
    checkpoint=None,
    ckpt_path=None,
    stop: int | None = None,
    **escape_args,
) -> tuple[PlateauDetector, PlateauEscape, Weights, L.Trainer]:
    """The scripted fit of ``epochs``, ended after ``stop`` of them (an interruption) where given."""
    L.seed_everything(0, verbose=False)
    weights = Weights()
    detector = PlateauDetector(patience=3, divergence_threshold=10.0)
    escape = PlateauEscape(actions=[action], **escape_args)
    extra = [*([checkpoint] if checkpoint else []), *([StopAfter(stop - 1)] if stop else [])]
    callbacks = [weights, detector, escape, *extra]
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=checkpoint is not None
    )
    model = Scripted(script, depth=3, width=4)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.fit(model, datamodule=Toy2DDataModule(), ckpt_path=ckpt_path)
    return detector, escape, weights, trainer


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_divergence_under_the_escapes_momentum_goes_back_to_where_the_run_was_out():
    # stall at epoch 3 (patience 3) -> momentum 0.9; out at epoch 4 (0.31 < 0.5 x 1.0); 100 at epochs 8 and 10
    detector, escape, weights, trainer = fit({8: 100.0, 10: 100.0}, {"momentum": 0.9}, epochs=12)
    kinds = [(e.kind, e.epoch) for e in detector.events]
    assert kinds == [(EventKind.STALL, 3), (EventKind.DIVERGENCE, 8), (EventKind.DIVERGENCE, 10)]
    back, again = detector.events[1], detector.events[2]
    assert back.recovered and [a.action for a in back.actions] == [
        "diverged: rolled back to epoch 4 (out of the stall), its own settings back"
    ]
    assert back.actions[0].momentum == [0.0] and back.actions[0].lr == [0.1]
    assert same(weights.at_start[9], weights.at_end[4])  # the weights of the point out of the stall
    assert not same(weights.at_end[8], weights.at_end[4])
    # diverged from that point again, under its own settings: back there with half the lr
    assert again.recovered and again.actions[0].action.endswith("its own settings back, lr x0.5")
    assert (again.actions[0].lr_from, again.actions[0].lr) == ([0.1], [0.05])
    assert same(weights.at_start[11], weights.at_end[4]) and escape._safe["tries"] == 2
    assert trainer.current_epoch == 12 and trainer.optimizers[0].param_groups[0]["lr"] == 0.05


def test_each_divergence_from_the_point_halves_the_lr_until_the_retries_are_spent():
    script = dict.fromkeys(range(6, 17), 100.0)  # diverges at every epoch from 6 on
    detector, escape, weights, trainer = fit(script, {"momentum": 0.9}, epochs=20)
    divergences = [e for e in detector.events if e.kind is EventKind.DIVERGENCE]
    assert [e.epoch for e in divergences] == list(range(6, 17))
    lrs = [e.actions[0].lr[0] if e.actions else None for e in divergences]
    assert lrs == [pytest.approx(0.1 / 2**k) for k in range(10)] + [None]  # down to 1/512 of the lr
    assert [e.recovered for e in divergences] == [True] * 10 + [False]  # the eleventh: no point left, the run stops
    assert escape._safe is None and trainer.current_epoch == 17


# diverged at 8 and 10; back at the stall at 9 and 12 (below): resumed after the first return
@pytest.mark.parametrize(
    ("script", "stop", "epochs"),
    [({8: 100.0, 10: 100.0}, 9, 12), ({8: 100.0, 10: 100.0}, 5, 12), (dict.fromkeys(range(7, 20), 1.0), 11, 15)],
)  # stopped after epoch 4: the point out of the stall taken, its first check (epoch 5) still to come
def test_a_resumed_run_goes_back_to_the_same_point_with_the_same_lr(tmp_path, script, stop, epochs):
    momentum = {"momentum": 0.9}
    straight, _, _, straight_trainer = fit(script, momentum, epochs=epochs)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(script, momentum, epochs=epochs, checkpoint=checkpoint, stop=stop)
    detector, escape, _, trainer = fit(script, momentum, epochs=epochs, ckpt_path=tmp_path / "last.ckpt")
    assert [(e.epoch, [a.action for a in e.actions]) for e in detector.events] == [
        (e.epoch, [a.action for a in e.actions]) for e in straight.events
    ]
    assert escape._safe["tries"] == 2 and trainer.optimizers[0].param_groups[0]["lr"] == 0.05
    for a, b in zip(trainer.lightning_module.parameters(), straight_trainer.lightning_module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_divergence_under_the_runs_own_settings_goes_back_at_half_the_lr_at_once():
    # the action left the settings as they were (lr x1): at x1 the run would take the same path again
    detector, escape, weights, trainer = fit({8: 100.0}, {"lr_factor": 1.0}, epochs=12)
    assert [(e.kind, e.epoch) for e in detector.events] == [(EventKind.STALL, 3), (EventKind.DIVERGENCE, 8)]
    back = detector.events[1]
    assert back.recovered and [a.action for a in back.actions] == [
        "diverged: rolled back to epoch 4 (out of the stall), its own settings back, lr x0.5"
    ]
    assert same(weights.at_start[9], weights.at_end[4]) and trainer.current_epoch == 12
    # the point out of the stall stays, and is checkpointed with the run's own settings
    restored = PlateauEscape(actions=[{"lr_factor": 1.0}])
    restored.load_state_dict(escape.state_dict())
    assert (
        restored._safe["epoch"] == 4
        and restored._safe["tries"] == 2
        and same(restored._safe["model"], weights.at_end[4])
    )
    assert restored._own[0][0]["momentum"] == 0.0


def test_a_point_out_of_the_stall_whose_weights_diverge_at_the_next_check_is_not_gone_back_to():
    # out at epoch 4 (0.31); epoch 5's loss, the first of the weights taken at 4, diverges: no point to go back to
    detector, escape, _, trainer = fit({5: 100.0}, {"momentum": 0.9}, epochs=12)
    assert [(e.kind, e.epoch) for e in detector.events] == [(EventKind.STALL, 3), (EventKind.DIVERGENCE, 5)]
    assert detector.events[1].actions == [] and not detector.events[1].recovered
    assert escape._safe is None and escape._pending is None and trainer.current_epoch == 6


def test_a_run_the_escape_never_got_out_of_a_stall_is_left_to_diverge():
    # stalled at 1.0 throughout: no point to go back to; the divergence ends the fit as without the escape
    detector, escape, _, trainer = fit(dict.fromkeys(range(4, 20), 1.0) | {8: 100.0}, {"momentum": 0.9}, epochs=12)
    assert [(e.kind, e.epoch) for e in detector.events][-1] == (EventKind.DIVERGENCE, 8)
    assert escape._safe is None and trainer.current_epoch == 9


@pytest.mark.parametrize(("action", "lrs"), [({"momentum": 0.9}, [0.1, 0.05]), ({"lr_factor": 1.0}, [0.05, 0.025])])
def test_a_run_that_stalls_back_at_the_stall_it_was_out_of_goes_back_to_where_it_was_out(action, lrs):
    # stall at 3 (1.0); out at 4 (0.31); 1.0 again from epoch 7 on: stalls at 1.0 at epochs 9 and 12. Under
    # the escape's momentum, back at x1 with its own settings; under its own (lr x1), x0.5 at once
    detector, escape, weights, trainer = fit(dict.fromkeys(range(7, 20), 1.0), action, epochs=15)
    assert [(e.kind, e.epoch) for e in detector.events] == [(EventKind.STALL, e) for e in (3, 9, 12)]
    for event, lr in zip(detector.events[1:], lrs, strict=True):
        assert [a.action for a in event.actions] == [
            "back at the stall left at 1: rolled back to epoch 4 (out of the stall), its own settings back"
            + ("" if lr == 0.1 else f", lr x{lr / 0.1:g}")
        ]
        assert event.actions[0].lr == [pytest.approx(lr)] and event.actions[0].momentum == [0.0]
        assert same(weights.at_start[event.epoch + 1], weights.at_end[4])
    assert escape._safe["tries"] == (2 if lrs[0] == 0.1 else 3)


def test_an_lr_raise_in_force_at_the_point_is_undone_there():
    # the raise is kept (restore_lr_below null): at the point out of the stall the lr is 0.2
    detector, escape, weights, trainer = fit({8: 100.0}, {"lr_factor": 2.0}, epochs=10, restore_lr_below=None)
    back = detector.events[1]
    assert back.recovered and back.actions[0].action.startswith("diverged: rolled back to epoch 4")
    assert (back.actions[0].lr_from, back.actions[0].lr) == ([0.2], [0.1])
    assert escape.lr_scale == 1.0 and trainer.optimizers[0].param_groups[0]["lr"] == 0.1


class ScriptedSGD(Scripted):
    def configure_optimizers(self):  # a method, not a lambda: ddp_spawn pickles the model
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_divergence_under_kicks_kept_by_a_rollback_goes_back_there_before_the_run_was_ever_out():
    # never out of the stall: layer-wise steps at epoch 3, kept (probation null); momentum 0.9 at 6;
    # 100 at epoch 8 rolls the momentum back, the steps stay; 100 again at 10, under the steps
    script = {epoch: 1.0 for epoch in range(4, 20)} | {8: 100.0, 10: 100.0}
    steps_then_momentum = [{"trust_ratio": 0.01}, {"momentum": 0.9}]
    L.seed_everything(0, verbose=False)
    detector, escape = (
        PlateauDetector(patience=3, divergence_threshold=10.0),
        PlateauEscape(steps_then_momentum, probation=None),
    )
    trainer = quiet_trainer(
        max_epochs=12, limit_val_batches=0, callbacks=[detector, escape], enable_checkpointing=False
    )
    model = ScriptedSGD(script, depth=3, width=4)
    trainer.fit(model, datamodule=Toy2DDataModule())
    assert [(e.kind, e.epoch) for e in detector.events][:4] == [
        (EventKind.STALL, 3), (EventKind.STALL, 6), (EventKind.DIVERGENCE, 8), (EventKind.DIVERGENCE, 10),
    ]  # fmt: skip
    again = detector.events[3]
    assert again.recovered and [a.action for a in again.actions] == [
        "diverged: rolled back to epoch 6, before 'momentum 0.9', its own settings back"
    ]
    assert escape.trust_ratio is None and escape._safe["tries"] == 1 and trainer.current_epoch == 12


def test_a_snapshot_restored_stays_as_it_was_taken():
    # the optimizer takes a loaded state's tensors as they are: its next steps must not change the snapshot
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = types.SimpleNamespace(optimizers=[optimizer], lr_scheduler_configs=[])

    def step():
        optimizer.zero_grad()
        model(torch.ones(4, 2)).sum().backward()
        optimizer.step()

    step()
    snapshot = snapshots.take_snapshot(trainer, model, epoch=0)
    taken = copy.deepcopy(snapshot["optimizers"][0]["state"])
    for _ in range(2):  # restored, then stepped from, twice: the second restore is the first's state
        snapshots.restore_snapshot(trainer, model, snapshot)
        assert all(torch.equal(optimizer.state[p]["momentum_buffer"], taken[i]["momentum_buffer"])
                   for i, p in enumerate(model.parameters()))  # fmt: skip
        step()


class DumpRank(L.Callback):
    """Each rank saves its events (actions and lrs), weights and lr at the end of fit, and takes its process group
    down."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        detector = next(cb for cb in trainer.callbacks if isinstance(cb, PlateauDetector))
        events = [(e.kind.value, e.epoch, [(a.action, a.lr) for a in e.actions]) for e in detector.events]
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        state = {"events": events, "weights": weights, "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")

    def teardown(self, trainer, pl_module, stage):
        # Lightning leaves a gloo process group up (it destroys only NCCL's, at exit). Left to the spawned
        # worker's interpreter shutdown, rank 1 once aborted there in CI ("terminate called without an active
        # exception"); src/cli.py destroys it the same way. This hook runs after the strategy's teardown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="2 CPU processes need 2 cores")
def test_both_ranks_go_back_to_the_same_point_with_the_same_lr(tmp_path):
    L.seed_everything(0, verbose=False)
    detector, escape = (
        PlateauDetector(patience=3, divergence_threshold=10.0),
        PlateauEscape(actions=[{"momentum": 0.9}]),
    )
    trainer = quiet_trainer(
        max_epochs=12, limit_val_batches=0, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[detector, escape, DumpRank(tmp_path)],
    )  # fmt: skip
    trainer.fit(ScriptedSGD({8: 100.0, 10: 100.0}, depth=3, width=4), datamodule=Toy2DDataModule())
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [(kind, epoch) for kind, epoch, _ in states[0]["events"]] == [
        ("stall", 3),
        ("divergence", 8),
        ("divergence", 10),
    ]
    assert states[0]["events"][2][2] == [
        ("diverged: rolled back to epoch 4 (out of the stall), its own settings back, lr x0.5", [0.05])
    ]
    assert states[0]["events"] == states[1]["events"] and states[0]["lr"] == states[1]["lr"] == 0.05
    assert torch.equal(states[0]["weights"], states[1]["weights"])


class BlowsUpOnceOutOnlyUnderTheSteps(OutOnlyUnderTheSteps):
    """0.7, 0.3 while the layer-wise steps are in force (the own settings take the run back to its
    stall), and a NaN in epoch 5."""

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        return logits, loss * float("nan") if self.current_epoch == 5 else loss


def test_a_run_whose_kicks_stay_goes_back_to_its_safe_point_with_them(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=2, min_delta=0.5)
    escape = PlateauEscape(actions=[{"trust_ratio": 0.01, "momentum": 0.9}], restore_lr_below=0.5)
    model = BlowsUpOnceOutOnlyUnderTheSteps(depth=3)
    model.escape = escape
    trainer = quiet_trainer(max_epochs=7, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=Toy2DDataModule())
    stall, divergence, after = detector.events
    assert stall.actions[-1].action.startswith("train/loss back at 0.7") and escape.keep_kicks
    out_at = stall.actions[1].epoch  # where the steps were undone: the run was out of the stall there
    back = divergence.actions[0]
    assert divergence.kind is EventKind.DIVERGENCE and divergence.recovered
    # the settings there held when it diverged: halved at once, the steps too (they do not follow the lr)
    kept = f"its settings then, the kicks kept, lr x0.5, steps of {0.01 * KEPT_STEPS / 2:g} x |W|"
    assert back.action == f"diverged: rolled back to epoch {out_at} (out of the stall), {kept}"
    # the steps and the momentum stay: the run stays out of its stall (0.3), where its own settings took it back (0.7)
    assert back.momentum == [0.9] and back.lr == [pytest.approx(0.05)] and after.value == pytest.approx(0.3)


@pytest.mark.parametrize("check_finite", [True, False])
def test_an_early_stopping_that_would_end_the_fit_at_a_nan_rolled_back_is_warned_about(check_finite):
    import warnings

    from lightning.pytorch.callbacks import EarlyStopping

    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3, divergence_threshold=10.0)
    escape = PlateauEscape(actions=[{"momentum": 0.9}])
    stop = EarlyStopping("train/loss", patience=100, check_on_train_epoch_end=True, check_finite=check_finite)
    trainer = quiet_trainer(max_epochs=10, limit_val_batches=0, callbacks=[detector, escape, stop])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ScriptedSGD({6: float("nan")}, depth=3, width=4), datamodule=Toy2DDataModule())
    warned = [str(w.message) for w in caught if "give it check_finite=False" in str(w.message)]
    assert warned == ([
        "PlateauEscape: EarlyStopping(monitor='train/loss') would end the fit at a NaN that PlateauEscape rolls back;"
        " give it check_finite=False"
    ] if check_finite else [])  # fmt: skip
    assert detector.events[1].actions[0].action.startswith("diverged: rolled back to epoch 4")
    assert trainer.current_epoch == (7 if check_finite else 10)  # what the warning is about: the fit ended at the NaN
