"""PlateauDetector's step rule: a stall judged on the training steps' losses (mini-batches, streams, full batches)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from src.callbacks import PlateauDetector
from src.callbacks.loss_trend import LossTrend, fit_trend
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import quiet_trainer


def noisy(means: list[float], relative_noise: float, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(means), generator=generator, dtype=torch.float64)
    return [m * (1 + relative_noise * float(n)) for m, n in zip(means, noise, strict=True)]


def stalls(values: list[float], window: int = 500) -> list[int]:
    """The steps at which the rule reports a stall over ``values`` (one per step)."""
    rule, found = LossTrend(window=window), []
    for step in range(1, len(values) + 1):
        if rule.due(step) and rule.check(step, fit_trend(values[step - window : step])):
            found.append(step)
            rule.restart(step)
    return found


def test_flat_and_drifting_losses_stall_but_a_noisy_healthy_one_does_not():
    # Fashion-MNIST's shapes: a stuck net at chance (2.30, 0.4% noise), one drifting 0.1% over
    # 5000 steps, and a healthy one falling 6% an epoch under 25% batch noise.
    flat = noisy([2.3] * 2000, 0.004)
    drift = noisy([2.3 * (1 - 0.001 * t / 5000) for t in range(5000)], 0.005)
    healthy = noisy([0.3 * 0.94 ** (t / 550) for t in range(5000)], 0.25)
    assert stalls(flat) == [500, 1000, 1500, 2000]
    assert stalls(drift)[:2] == [500, 1000]
    assert stalls(healthy) == []


def test_a_window_that_rises_but_beats_an_earlier_window_is_no_stall():
    # Within an epoch a learning net's loss can rise (samples seen longer ago come later): the
    # line through the window points up, but its mean is below the earlier window's.
    rule = LossTrend(window=10, every=10)
    assert rule.check(10, fit_trend([1.0] * 10)) is True  # flat, no earlier window
    rule.restart(10)
    rising = [0.90 + 0.005 * t for t in range(10)]
    assert fit_trend(rising).optimistic < 0
    assert rule.check(20, fit_trend(rising)) is False
    assert rule.check(30, fit_trend([1.2] * 10)) is True  # flat and worse than the best window


class Frozen(MLPClassifier):
    """A scripted plateau: with lr 0 the loss never moves."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_minibatch_stall_is_reported_within_the_epoch():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(step_window=50)  # patience 100 epochs: the epoch rule cannot fire
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[detector])
    # batches of 1000: the frozen net's loss varies ~0.5% from batch to batch (~1.5% with batches
    # of 100: the line's bound is then wider, and a short window is seldom sure of a stall)
    trainer.fit(Frozen(depth=3, width=8), datamodule=Toy2DDataModule(n_samples=100_000, batch_size=1000))
    assert [(e.epoch, e.step) for e in detector.events][:3] == [(0, 50), (0, 100), (1, 150)]
    assert detector.events[0].diagnosis is not None
    assert abs(detector.events[0].value - float(trainer.callback_metrics["train/loss"])) < 0.05


def test_a_learning_minibatch_run_is_not_a_stall():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(step_window=50)
    model = MLPClassifier(depth=2, width=8, activation="relu")
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.002)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[detector])
    trainer.fit(model, datamodule=Toy2DDataModule(n_samples=2000, batch_size=10))
    assert detector.events == []


class Drifting(Frozen):
    """A scripted drift in a full batch: the frozen net's loss plus ``1 - w``, ``w`` taking SGD steps
    of 4e-4 (a step an epoch). Each epoch beats the last by ~0.02%, more than the epoch rule's
    ``min_delta`` (0.01%): only 0.7% in 30 epochs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def _logits_and_loss(self, batch):
        logits, loss = super()._logits_and_loss(batch)
        return logits, loss + 1 - self.w

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.net.parameters(), "lr": 0.0}, {"params": [self.w], "lr": 4e-4}])


def test_a_full_batch_drift_is_a_stall_for_the_step_rule_only():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=20, step_window=30)
    trainer = quiet_trainer(max_epochs=70, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Drifting(depth=2, width=4), datamodule=Toy2DDataModule())
    assert detector.tracker.wait == 0  # every epoch improved on the best, by the epoch rule
    assert [e.step for e in detector.events] == [30, 60]  # a window of 30 steps each, from the start


def test_a_full_batch_step_window_spans_twice_the_patience():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=10)  # step_window 500: 500 epochs of a full batch
    trainer = quiet_trainer(max_epochs=70, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Drifting(depth=2, width=4), datamodule=Toy2DDataModule())
    assert detector.steps.rule.window == 21 and detector.tracker.wait == 0  # 2 x 10 epochs of one step
    assert [e.step for e in detector.events] == [22, 44, 66]  # checked every 2 steps, from a full window


def test_a_flat_full_batch_is_still_reported_by_the_epoch_rule_first():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=30, step_window=50)
    trainer = quiet_trainer(max_epochs=40, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Frozen(depth=2, width=4), datamodule=Toy2DDataModule())
    assert [e.epoch for e in detector.events] == [30]  # patience 30; the step rule's first window ends at 50


def test_at_an_epochs_end_the_epoch_rule_goes_first():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=3, step_window=4)  # both due at the end of epoch 3
    trainer = quiet_trainer(max_epochs=10, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Frozen(depth=2, width=4), datamodule=Toy2DDataModule())
    # the epoch rule's stall restarts the step window: the step rule would have called epochs 3 and 5
    assert [e.epoch for e in detector.events] == [3, 6, 9]


class Stream(IterableDataset):
    """Endless batches of two-cluster points: a data set with no length."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            y = torch.randint(0, 2, (1000,), generator=generator)
            x = torch.randn(1000, 2, generator=generator) + 4.0 * torch.stack([y, 1 - y], dim=1)
            yield x, y


class FrozenOnAStream(Frozen):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=None)


def test_a_stream_under_max_steps_is_watched():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(step_window=40)
    trainer = quiet_trainer(max_steps=130, limit_val_batches=0, callbacks=[detector])
    trainer.fit(FrozenOnAStream(depth=3, width=8))
    assert [e.step for e in detector.events] == [40, 80, 120]


def test_step_state_is_checkpointed():
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(step_window=50)
    trainer = quiet_trainer(max_steps=70, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Frozen(depth=3, width=8), datamodule=Toy2DDataModule(n_samples=100_000, batch_size=1000))
    restored = PlateauDetector(step_window=50)
    restored.load_state_dict(detector.state_dict())
    assert restored.steps.rule.start == detector.steps.rule.start == 50
    assert restored.steps.rule.recent == detector.steps.rule.recent
    assert restored.steps.losses.read(trainer) == pytest.approx(detector.steps.losses.read(trainer))
    assert len(restored.steps.losses.values) == 50 and list(restored.steps.losses.steps) == list(range(21, 71))
    assert list(restored.steps.losses.epochs) == list(detector.steps.losses.epochs) == [0] * 50
    older = {**detector.state_dict()["steps"], "losses": [2.0] * 50}  # saved when the window held no steps
    restored.steps.load_state_dict(older)  # not placeable in the window: it fills again
    assert len(restored.steps.losses.values) == 0 and restored.steps.rule.start == 50


@pytest.mark.parametrize("monitor", ["val/loss", "train/acc"])
def test_the_step_rule_watches_a_training_loss_only(monitor):
    detector = PlateauDetector(monitor=monitor, mode="min", step_window=20)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Frozen(depth=2, width=4), datamodule=Toy2DDataModule(n_samples=500, batch_size=10))
    assert detector.events == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_window": 2}, "PlateauDetector: step_window must be >= 3, got 2"),
        ({"step_min_delta": 1.5}, "PlateauDetector: step_min_delta must be in (0, 1), got 1.5"),
    ],
)
def test_bad_step_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        PlateauDetector(**kwargs)
    assert str(err.value) == message


def test_two_detectors_in_one_trainer_keep_their_own_events_and_share_the_file(tmp_path):
    from src.callbacks import PlateauEscape
    from src.callbacks.events import load_events

    L.seed_everything(0, verbose=False)
    loss = PlateauDetector(monitor="train/loss", patience=3)
    accuracy = PlateauDetector(monitor="train/acc", mode="max", patience=5)
    escape = PlateauEscape(actions=[{"lr_factor": 2.0, "repeat": True}], probation=None, restore_lr_below=None)
    trainer = quiet_trainer(
        max_epochs=12, limit_val_batches=0, callbacks=[loss, accuracy, escape], default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
    )  # fmt: skip
    trainer.fit(Frozen(depth=2, width=4), datamodule=Toy2DDataModule())
    assert loss.state_key != accuracy.state_key
    assert [e.epoch for e in loss.events] == [3, 6, 9] and [e.epoch for e in accuracy.events] == [5, 10]
    saved = load_events(tmp_path / "lightning_logs" / "version_0" / "stall_events.json")
    assert [(e.monitor, e.epoch) for e in saved] == [
        ("train/loss", 3), ("train/acc", 5), ("train/loss", 6), ("train/loss", 9), ("train/acc", 10),
    ]  # fmt: skip
    assert all(e.actions for e in saved)  # the escape acted on both detectors' stalls


class Ramp(L.LightningModule):
    """A scripted training loss, ``2 - w`` with ``w`` taking SGD steps of ``drift`` up to ``cap`` (flat from
    there), from ``batches`` batches an epoch; under ``gan`` two optimizers step every batch (manual
    optimization: two global steps a batch) and the loss is ``levels[batch]`` (flat, then a new level)."""

    def __init__(self, drift: float = 0.0, cap: float = 1.0, batches: int = 8, levels: list[float] | None = None):
        super().__init__()
        self.drift, self.cap, self.batches, self.levels = drift, cap, batches, levels
        self.w, self.v = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))
        self.automatic_optimization = levels is None
        self.seen = 0

    def training_step(self, batch, batch_idx):
        if self.levels is None:
            loss = 2.0 - self.w.clamp(max=self.cap) + 0 * batch[0].sum()
        else:
            loss = torch.tensor(self.levels[self.seen])
            self.seen += 1
            for optimizer, weight in zip(self.optimizers(), (self.w, self.v), strict=True):
                optimizer.zero_grad()
                self.manual_backward(loss + 0 * weight)
                optimizer.step()
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        sgd = torch.optim.SGD([self.w], lr=self.drift)
        return sgd if self.levels is None else [sgd, torch.optim.SGD([self.v], lr=0.0)]

    def train_dataloader(self):
        return DataLoader(torch.utils.data.TensorDataset(torch.zeros(self.batches, 1)), batch_size=1)


@pytest.mark.parametrize("accumulate", [2, 4])
def test_the_window_counts_optimizer_steps_whatever_the_batches_a_step(accumulate):
    # the loss falls 0.03 a step to 1.3, then is flat: a window of 20 steps sees 0.6 (~35%) while it falls
    found = {}
    for batches_a_step in (1, accumulate):
        detector = PlateauDetector(step_window=20)
        trainer = quiet_trainer(max_steps=80, limit_val_batches=0, callbacks=[detector],
                                accumulate_grad_batches=batches_a_step)  # fmt: skip
        trainer.fit(Ramp(drift=0.03, cap=0.7, batches=8 * batches_a_step))
        found[batches_a_step] = [(e.step, round(e.value, 4)) for e in detector.events]
    # flat from step 24 on (23 steps of 0.03, one to the cap); a stall is a flat window no better than an earlier
    # one: at step 60, the window to step 40 (flat from its fourth step). Lightning's outputs hold the loss divided
    # by the batches a step: the values are the loss as training_step returned it.
    assert found[1] == [(60, 1.3), (80, 1.3)]
    assert found[accumulate] == found[1]


def test_under_manual_optimization_a_window_holds_the_steps_since_the_last_stall_only():
    # two optimizer steps a batch: a window of 20 steps is 10 batches; the loss is flat at 2.0 for the first
    # window's batches, then flat at 3.0 (a remedy that did harm): the second stall's value is that level
    detector = PlateauDetector(step_window=20)
    trainer = quiet_trainer(max_steps=60, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Ramp(levels=[2.0] * 10 + [3.0] * 20, batches=30))
    assert [(e.step, round(e.value, 4)) for e in detector.events] == [(20, 2.0), (40, 3.0), (60, 3.0)]


class Drawn(L.LightningModule):
    """A scripted mini-batch loss: ``1 - fall * step`` times 1.2 or 0.8 by the batch, half of each in every
    epoch in a new order: the noise of which samples a batch drew, none in an epoch's mean."""

    def __init__(self, fall: float, batches: int = 10):
        super().__init__()
        self.fall, self.batches = fall, batches
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.generator = torch.Generator().manual_seed(0)

    def on_train_epoch_start(self):
        self.draws = torch.tensor([1.2, 0.8] * (self.batches // 2))[
            torch.randperm(self.batches, generator=self.generator)
        ]

    def training_step(self, batch, batch_idx):
        loss = (1 - self.fall * self.global_step) * self.draws[batch_idx] + 0 * self.w
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.0)

    def train_dataloader(self):
        return DataLoader(torch.utils.data.TensorDataset(torch.zeros(self.batches, 1)), batch_size=1)


@pytest.mark.parametrize(("fall", "expected"), [(0.0, [100, 200, 300]), (0.0003, [])])
def test_a_window_of_whole_epochs_goes_through_their_means(fall, expected):
    # batch to batch +-20%: a line through 100 step losses is sure of nothing under ~14%; through the means of
    # its 10 epochs a flat loss is a stall at once, and one falling 3% a window is none
    detector = PlateauDetector(step_window=100)
    trainer = quiet_trainer(max_steps=300, limit_val_batches=0, callbacks=[detector])
    trainer.fit(Drawn(fall))
    assert [e.step for e in detector.events] == expected
    assert all(e.value == pytest.approx(1.0) for e in detector.events)
