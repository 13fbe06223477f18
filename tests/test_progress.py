"""EpochProgressBar: one line over the fit's epochs with the loss and an open stall; the CLI's flag turns it off."""

from __future__ import annotations

import pytest
import torch

from src.callbacks import EpochProgressBar, PlateauDetector
from src.callbacks.events import EventKind, StallEvent
from src.callbacks.progress import open_stall
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import quiet_trainer


class Frozen(MLPClassifier):
    """A scripted stall: with lr 0 the loss never moves."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_bar_counts_epochs_and_shows_the_loss_and_the_open_stall(capsys):
    bar, detector = EpochProgressBar(refresh_seconds=0), PlateauDetector(patience=3)
    trainer = quiet_trainer(max_epochs=12, enable_progress_bar=True, callbacks=[bar, detector], limit_val_batches=0)
    trainer.fit(Frozen(depth=3, width=4), datamodule=Toy2DDataModule(n_samples=20))
    err = capsys.readouterr().err
    assert "12/12" in err and "train/loss=0." in err
    stall = next(e for e in detector.events if e.kind == "stall")
    assert f"stall={stall.diagnosis} since epoch {stall.epoch}" in err
    assert open_stall(trainer) is detector.events[-1]  # lr 0: never out of it
    assert "PlateauDetector: stall" in err  # Lightning's message, printed above the bar


def test_a_stall_closes_once_the_loss_has_halved():
    class Run:
        callbacks = [PlateauDetector()]
        callback_metrics = {"train/loss": torch.tensor(0.30)}

    Run.callbacks[0].events = [StallEvent(EventKind.STALL, 5, 5, "train/loss", 0.69)]
    assert open_stall(Run) is None
    Run.callback_metrics = {"train/loss": torch.tensor(0.40)}
    assert open_stall(Run).epoch == 5


def test_the_bar_redraws_at_most_every_refresh_seconds(capsys):
    bar = EpochProgressBar(refresh_seconds=3600)
    trainer = quiet_trainer(max_epochs=50, enable_progress_bar=True, callbacks=[bar], limit_val_batches=0)
    trainer.fit(MLPClassifier(depth=2, width=4), datamodule=Toy2DDataModule(n_samples=20))
    err = capsys.readouterr().err
    assert "50/50" in err and not any(f" {n}/50 " in err for n in range(2, 50))  # the first draw and the last


def test_the_cli_flag_turns_the_configs_bar_off(main):
    result = main("fit", "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false")
    assert result.returncode == 0 and "/3 [" not in result.stderr
    result = main("fit", "--trainer.max_epochs=3")
    assert result.returncode == 0 and "3/3" in result.stderr


def test_refresh_seconds_must_not_be_negative():
    with pytest.raises(ValueError, match="refresh_seconds must be >= 0"):
        EpochProgressBar(refresh_seconds=-1)


def test_the_bar_and_the_escape_agree_when_the_run_is_out_of_the_stall():
    from types import SimpleNamespace

    from src.callbacks import PlateauEscape

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    detector = PlateauDetector()
    detector.save_events = lambda trainer: None  # no run directory here
    escape = PlateauEscape(
        actions=[{"lr_factor": 5}], restore_lr_below=0.2, rollback_on_divergence=False, probation=None
    )
    escape._detector = detector
    stall = StallEvent(EventKind.STALL, 5, 5, "train/loss", 0.69)
    detector.events = [stall]
    trainer = SimpleNamespace(
        optimizers=[optimizer], lr_scheduler_configs=[], loggers=[], current_epoch=6, global_step=6,
        is_global_zero=True, callbacks=[detector], callback_metrics={}, estimated_stepping_batches=float("inf"),
    )  # fmt: skip
    escape.on_stall(trainer, None, stall)
    for loss, kicked in ((0.3, True), (0.2, True), (0.1, False)):  # halved at 0.3, but not below 0.2 x 0.69
        trainer.callback_metrics = {"train/loss": torch.tensor(loss)}
        escape.on_check(trainer, None, loss)
        assert (optimizer.param_groups[0]["lr"] == pytest.approx(0.5)) is kicked
        assert (open_stall(trainer) is stall) is kicked
