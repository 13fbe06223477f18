"""PlateauDetector: the decision rule and the diagnosis without a Trainer, then wired into one."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from src.callbacks import GradNormMonitor, PlateauDetector
from src.callbacks.events import load_events
from src.callbacks.grad_flow import GradProfile
from src.callbacks.plateau_rule import PlateauTracker, diagnose
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import MemoryLogger, quiet_trainer


def statuses(tracker: PlateauTracker, values) -> list[str]:
    return [tracker.update(v).value for v in values]


def test_patience_counts_checks_without_improvement():
    tracker = PlateauTracker(patience=3, min_delta=0.0)
    assert statuses(tracker, [1.0, 0.9, 0.9, 0.9, 0.9, 0.9]) == [
        "improved", "improved", "waiting", "waiting", "plateau", "waiting",
    ]  # fmt: skip


def test_relative_and_absolute_thresholds_follow_reduce_lr_on_plateau():
    rel = PlateauTracker(patience=1, min_delta=0.1, threshold_mode="rel")
    assert statuses(rel, [1.0, 0.91, 0.89]) == ["improved", "plateau", "improved"]
    absolute = PlateauTracker(patience=1, min_delta=0.05, threshold_mode="abs")
    assert statuses(absolute, [10.0, 9.96, 9.9]) == ["improved", "plateau", "improved"]
    maximise = PlateauTracker(mode="max", patience=1, min_delta=0.0)
    assert statuses(maximise, [0.5, 0.6, 0.6]) == ["improved", "improved", "plateau"]


def test_warmup_and_cooldown_hold_off_a_stall():
    tracker = PlateauTracker(patience=1, min_delta=0.0, warmup=2, cooldown=2)
    assert statuses(tracker, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == [
        "warmup", "warmup", "plateau", "cooldown", "cooldown", "plateau",
    ]  # fmt: skip


def test_nan_and_inf_are_divergence_not_plateau():
    tracker = PlateauTracker(patience=1)
    assert statuses(tracker, [1.0, math.nan, math.inf]) == ["improved", "diverged", "diverged"]
    assert tracker.best == 1.0


def test_tracker_state_round_trips():
    tracker = PlateauTracker(patience=5)
    statuses(tracker, [1.0, 1.0, 1.0])
    restored = PlateauTracker(patience=5)
    restored.load_state_dict(tracker.state_dict())
    assert restored.update(1.0) == tracker.update(1.0) and restored.wait == tracker.wait == 3


@pytest.mark.parametrize("bad", [{"patience": 0}, {"mode": "up"}, {"threshold_mode": "pct"}, {"min_delta": -1}])
def test_bad_tracker_arguments_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PlateauDetector(**bad)


def profile(step: int, norms: list[float]) -> GradProfile:
    return GradProfile(step, tuple(f"layers.{i}" for i in range(len(norms))), tuple(norms), (True,) * len(norms))


def test_diagnosis_tells_vanishing_from_flat():
    vanishing = [profile(s, [1e-15, 1e-12, 1e-8]) for s in range(5)]
    flat = [profile(s, [7e-6, 9e-6, 1.6e-5]) for s in range(5)]
    steep = [profile(s, [1e-2, 1e-2, 1e-1]) for s in range(5)]
    assert diagnose(vanishing) == "vanishing"
    assert diagnose(flat) == "flat"
    assert diagnose(steep) == "unclear"
    assert diagnose([]) == "unclear"


def test_diagnosis_ignores_steps_whose_gradient_underflowed_to_zero():
    window = [profile(s, [1e-15, 1e-12, 1e-8 if s % 3 else 0.0]) for s in range(9)]
    assert diagnose(window) == "vanishing"


def stalled_run(depth: int, epochs: int, tmp_path, **detector_args):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=50, **detector_args)
    logger = MemoryLogger()
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        log_every_n_steps=10,
        logger=logger,
        default_root_dir=tmp_path,
        callbacks=[GradNormMonitor(), detector],
    )
    trainer.fit(MLPClassifier(depth=depth, activation="sigmoid"), datamodule=Toy2DDataModule())
    return detector, logger


@pytest.mark.slow
def test_source_stalls_are_diagnosed_flat_at_depth_7_and_vanishing_at_depth_18(tmp_path):
    shallow, logger = stalled_run(7, 300, tmp_path)
    deep, _ = stalled_run(18, 300, tmp_path)
    assert shallow.events and {e.diagnosis for e in shallow.events} == {"flat"}
    assert deep.events and {e.diagnosis for e in deep.events} == {"vanishing"}
    assert all(e.first_to_last < 1e-6 for e in deep.events)
    assert all(0.4 < e.value < 0.7 for e in shallow.events)
    assert logger.metrics["plateau/stall"] == [(e.step, pytest.approx(e.value)) for e in shallow.events]


def test_detector_without_monitor_computes_norms_itself(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=50, norms_every_n_steps=5)
    trainer = quiet_trainer(max_epochs=200, limit_val_batches=0, callbacks=[detector], default_root_dir=tmp_path)
    trainer.fit(MLPClassifier(depth=7, activation="sigmoid"), datamodule=Toy2DDataModule())
    assert detector.events and detector.events[0].diagnosis == "flat"


def test_events_are_written_to_json_and_kept_in_state(tmp_path):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=50)
    trainer = L.Trainer(
        max_epochs=200,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[GradNormMonitor(log_every_n_steps=10), detector],
    )
    trainer.fit(MLPClassifier(depth=7, activation="sigmoid"), datamodule=Toy2DDataModule())
    path = tmp_path / "lightning_logs" / "version_0" / "stall_events.json"
    saved = json.loads(path.read_text())
    assert saved[0]["kind"] == "stall" and saved[0]["diagnosis"] == "flat" and saved[0]["actions"] == []
    assert load_events(path) == detector.events
    restored = PlateauDetector(patience=50)
    restored.load_state_dict(detector.state_dict())
    assert restored.events == detector.events and restored.tracker.best == detector.tracker.best


class Frozen(MLPClassifier):
    """A scripted plateau: with lr 0 the loss never moves (from ~0.69 here)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize(("good_enough", "stalls"), [(None, 3), (0.5, 3), (0.8, 0)])
def test_good_enough_plateau_is_convergence_not_a_stall(good_enough, stalls):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3, good_enough=good_enough)
    trainer = quiet_trainer(max_epochs=10, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Frozen(depth=2, width=4), datamodule=Toy2DDataModule())
    assert 0.5 < float(trainer.callback_metrics["train/loss"]) < 0.8
    assert [e.epoch for e in detector.events] == [3, 6, 9][:stalls]


class Diverging(MLPClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.current_epoch >= 3:
            x = x * float("nan")
        return super().training_step((x, y), batch_idx)


def test_nan_metric_is_reported_as_divergence_and_stops(tmp_path):
    detector = PlateauDetector(patience=50)
    trainer = quiet_trainer(max_epochs=50, limit_val_batches=0, callbacks=[detector], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="diverged.*epoch 3"):
        trainer.fit(Diverging(), datamodule=Toy2DDataModule())
    assert [e.kind for e in detector.events] == ["divergence"]
    assert trainer.current_epoch == 4


def test_missing_metric_is_skipped_with_a_warning(tmp_path):
    detector = PlateauDetector(monitor="train/nothing", patience=2)
    trainer = quiet_trainer(max_epochs=5, limit_val_batches=0, callbacks=[detector], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="train/nothing.*not logged"):
        trainer.fit(MLPClassifier(), datamodule=Toy2DDataModule())
    assert detector.events == [] and trainer.current_epoch == 5


class NanValidation(MLPClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return super().validation_step((x * float("nan"), y), batch_idx)


def test_validate_sanity_check_and_fast_dev_run_count_no_checks(tmp_path):
    """EarlyStopping's guard: only a real fit's checks count, so ``validate`` after a fit, the sanity
    check and ``fast_dev_run`` neither move the patience nor report a (NaN) divergence."""
    L.seed_everything(0, verbose=False)
    dm = Toy2DDataModule()
    detector = PlateauDetector(monitor="val/loss", patience=1)
    model = MLPClassifier(depth=2, width=4)
    trainer = quiet_trainer(max_epochs=2, callbacks=[detector], default_root_dir=tmp_path, num_sanity_val_steps=1)
    trainer.fit(model, datamodule=dm)
    assert detector.tracker.checks == 2  # one per epoch; the sanity check did not count
    before = detector.state_dict()
    for _ in range(3):
        trainer.validate(NanValidation(depth=2, width=4), datamodule=dm, verbose=False)
    assert detector.state_dict() == before and not detector.events
    fast = PlateauDetector(monitor="val/loss", patience=1)
    quiet_trainer(fast_dev_run=2, callbacks=[fast]).fit(NanValidation(depth=2, width=4), datamodule=dm)
    assert fast.tracker.checks == 0 and not fast.events


class LogsPlainLoss(MLPClassifier):
    """A foreign project's habit: ``self.log("loss", ...)`` per step, no ``train/`` prefix."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss


@pytest.mark.parametrize(
    ("every_n_epoch", "limit_val", "monitor", "checks"),
    [
        (1, 0, "loss", 6),  # no validation at all: every train epoch end (EarlyStopping's rule)
        (1, None, "loss", 6),  # validation every epoch: its metrics are in by the train epoch end
        (3, None, "val/loss", 2),  # validation every 3rd epoch: after each validation run
        (3, None, "train/loss", 6),  # a train/ metric: every train epoch end whatever validation does
    ],
)
def test_checks_follow_earlystoppings_rule_for_where_the_metric_is_logged(every_n_epoch, limit_val, monitor, checks):
    detector = PlateauDetector(monitor=monitor)
    kwargs = {"limit_val_batches": limit_val} if limit_val is not None else {}
    trainer = quiet_trainer(max_epochs=6, callbacks=[detector], check_val_every_n_epoch=every_n_epoch, **kwargs)
    trainer.fit(LogsPlainLoss(depth=2, width=4), datamodule=Toy2DDataModule())
    assert detector.tracker.checks == checks


class LogsInItsOwnEpochEnd(MLPClassifier):
    """Logs its monitored metric in the LightningModule's own ``on_train_epoch_end``: 1, 1/2, 1/3, then flat."""

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        self.log("epoch_metric", 1.0 / min(self.current_epoch + 1, 3))


def test_a_metric_logged_in_the_modules_own_epoch_end_is_checked_in_that_epoch():
    detector = PlateauDetector(monitor="epoch_metric", patience=2, min_delta=0.0)
    seen = []
    detector.add_check_listener(lambda trainer, module, value: seen.append((trainer.current_epoch, value)))
    trainer = quiet_trainer(max_epochs=6, callbacks=[detector], limit_val_batches=0)
    trainer.fit(LogsInItsOwnEpochEnd(depth=2, width=4), datamodule=Toy2DDataModule())
    expected = [(epoch, 1.0 / min(epoch + 1, 3)) for epoch in range(6)]
    assert [e for e, _ in seen] == [e for e, _ in expected]
    assert [v for _, v in seen] == pytest.approx([v for _, v in expected])  # each epoch's own value, not the last
    # flat from epoch 2 on: the second check without improvement (epoch 4) is the stall
    assert [(e.kind, e.epoch) for e in detector.events] == [("stall", 4)]


def test_what_it_has_of_early_stopping_tells_the_truth():
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    detector = PlateauDetector(min_delta=1e-2, patience=3, divergence_threshold=5.0)
    assert detector.min_delta == -1e-2 and PlateauDetector(mode="max", min_delta=1e-2).min_delta == 1e-2
    assert detector.patience == 3 and detector.divergence_threshold == 5.0
    for value in (1.0, 1.0, 1.0):
        detector.tracker.update(value)
    assert detector.wait_count == 2 and float(detector.best_score) == 1.0

    class BlowsUp(MLPClassifier):
        def training_step(self, batch, batch_idx):
            self.log("train/blow", 100.0 if self.current_epoch >= 2 else 1.0, on_epoch=True, on_step=False)
            return super().training_step(batch, batch_idx)

    detector = PlateauDetector(monitor="train/blow", divergence_threshold=5.0)
    real = EarlyStopping(monitor="train/loss", patience=1000)
    trainer = quiet_trainer(max_epochs=6, callbacks=[detector, real], limit_val_batches=0)
    trainer.fit(BlowsUp(depth=2, width=4), datamodule=Toy2DDataModule(n_samples=20))
    assert trainer.early_stopping_callback is real and trainer.current_epoch == 3
    assert detector.stopping_reason is EarlyStoppingReason.DIVERGENCE_THRESHOLD and detector.stopped_epoch == 2
    assert real.stopping_reason is EarlyStoppingReason.NOT_STOPPED
    restored = PlateauDetector(divergence_threshold=5.0)
    restored.load_state_dict(detector.state_dict())
    assert restored.stopping_reason is EarlyStoppingReason.DIVERGENCE_THRESHOLD and restored.stopped_epoch == 2
