"""Every layer's statistics: shares and ratios computed by hand on small modules, then in a Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from src.callbacks import GradNormMonitor, LayerStatsMonitor, PlateauDetector
from src.callbacks.layer_stats import LayerStatistics
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import MemoryLogger, quiet_trainer
from tests.test_grad_norm import TinyNet, loader


def record(net: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer | None = None, margin: float = 0.03):
    """One recorded step of ``net`` on ``x``: forward, backward, the optimizer's step (if any)."""
    stats = LayerStatistics(margin)
    stats.arm(net, step=0)
    net(x).sum().backward()
    stats.before_step(net)
    if optimizer is not None:
        optimizer.step()
    return stats.finish(net)


def test_a_sigmoid_layer_pinned_at_its_bounds_is_saturated_and_the_next_is_not():
    net = nn.Sequential(nn.Linear(2, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[100.0, 0], [-100.0, 0], [0, 100.0], [0, -100.0]]))
        net[0].bias.zero_()
        net[2].weight.fill_(1e-3)
        net[2].bias.zero_()
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [0.001, 0.0]])  # the last row: every unit near 0.5
    stats = record(net, x)
    assert stats["0"].saturated == pytest.approx(12 / 16)
    assert stats["2"].saturated == 0.0 and stats["4"].saturated is None  # the output layer has no activation
    hand = torch.sigmoid(net[0](x))
    assert stats["0"].act_mean == pytest.approx(hand.mean().item()) and stats["0"].act_std == pytest.approx(
        hand.std().item()
    )


def test_the_margin_is_a_fraction_of_the_half_range():
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [1.0], [1.0]]))
        net[0].bias.copy_(torch.atanh(torch.tensor([0.96, 0.98, -0.975, 0.5])))
    stats = record(net, torch.zeros(1, 1))  # outputs 0.96, 0.98, -0.975, 0.5
    assert stats["0"].saturated == pytest.approx(2 / 4)  # |t| > 0.97
    assert record(net, torch.zeros(1, 1), margin=0.05)["0"].saturated == pytest.approx(3 / 4)  # |t| > 0.95


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.LeakyReLU(0.1), nn.ELU()])
def test_relu_family_units_with_no_positive_output_are_dead(activation):
    net = nn.Sequential(nn.Linear(2, 3), activation, nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([-5.0, 0.0, -10.0]))
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.5, 0.5]])  # units 0 and 2 are negative on every sample
    assert record(net, x)["0"].dead == pytest.approx(2 / 3)


def test_the_update_ratio_is_the_step_sgd_took():
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    before = net[0].weight.detach().clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    stats = record(net, x, optimizer)
    grad = net[0].weight.grad
    assert stats["0"].update_ratio == pytest.approx((0.1 * grad.norm() / before.norm()).item(), rel=1e-5)
    assert stats["0"].grad_to_weight == pytest.approx((grad.norm() / before.norm()).item(), rel=1e-5)


def test_the_update_ratio_is_the_step_adam_took():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    before = net[2].weight.detach().clone()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    stats = record(net, x, optimizer)
    grad = net[2].weight.grad
    # Adam's first step: m / (sqrt(v) + eps) with bias correction is g / (|g| + eps): lr per element
    step = 1e-3 * grad / (grad.abs() + 1e-8)
    assert stats["2"].update_ratio == pytest.approx((step.norm() / before.norm()).item(), rel=1e-4)


def test_a_foreign_cnn_with_batch_norm_gets_its_layers_and_activations_found():
    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = nn.BatchNorm2d(4)
            self.act = nn.ReLU()
            self.head = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.head(torch.flatten(self.act(self.norm(self.conv(x))), 1))

    net = SmallCNN()
    net.norm.bias.requires_grad_(False)
    with torch.no_grad():
        net.norm.bias.copy_(torch.tensor([-100.0, 0.0, 0.0, -100.0]))  # channels 0 and 3: never positive
    stats = record(net, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    assert list(stats) == ["conv", "head"]  # the norm layer is no layer of its own here
    assert stats["conv"].dead == pytest.approx(2 / 4) and stats["head"].dead is None


def test_a_frozen_layer_is_skipped_and_a_functional_activation_gets_the_layers_output():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Functional()
    net.b.weight.requires_grad_(False)
    x = torch.randn(4, 2)
    stats = record(net, x)
    assert list(stats) == ["a"] and stats["a"].dead is None  # F.relu is not seen
    assert stats["a"].act_mean == pytest.approx(net.a(x).mean().item())


def test_the_monitor_logs_every_layer_apart_by_margin_and_shares_the_gradient_pass(monkeypatch):
    from src.callbacks import grad_flow

    calls = []
    original = grad_flow.param_grad_norms
    monkeypatch.setattr(grad_flow, "param_grad_norms", lambda *a, **k: calls.append(1) or original(*a, **k))
    logger = MemoryLogger()
    monitors = [LayerStatsMonitor(log_every_n_steps=2), LayerStatsMonitor(margin=0.1, log_every_n_steps=2)]
    callbacks = [GradNormMonitor(log_every_n_steps=2), PlateauDetector(norms_every_n_steps=2), *monitors]
    quiet_trainer(max_steps=4, logger=logger, callbacks=callbacks).fit(TinyNet(), loader())
    assert len(calls) == 2  # steps 0 and 2: one pass for the four readers
    assert [s for s, _ in logger.metrics["update_ratio_log10/body.0"]] == [0, 0, 2, 2]
    assert "saturated/body.0" in logger.metrics and "saturated_m0.1/body.0" in logger.metrics  # apart
    assert "act_std/body.3" in logger.metrics and "saturated/body.3" not in logger.metrics
    narrow = [v for _, v in logger.metrics["saturated/body.0"]]
    wide = [v for _, v in logger.metrics["saturated_m0.1/body.0"]]
    assert len(narrow) == len(wide) == 2 and all(a <= b for a, b in zip(narrow, wide, strict=True))
    assert {s for s, _ in logger.metrics["update_ratio_log10/reference"]} == {0, 2}
    ratio = dict(logger.metrics["grad_to_weight/body.0"])[0]
    assert math.isfinite(ratio) and ratio > 0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"margin": 0.0}, "margin"), ({"margin": 1.0}, "margin"), ({"log_every_n_steps": 0}, "log_every_n_steps"),
     ({"histogram_every_n_steps": -1}, "histogram_every_n_steps")],
)  # fmt: skip
def test_bad_settings_are_one_line_naming_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=f"LayerStatsMonitor: {named}"):
        LayerStatsMonitor(**kwargs)


class Pinned(MLPClassifier):
    """A sigmoid net whose first layer is pinned at 1.0 on every sample (z > 600), with lr 0: a stall."""

    def __init__(self) -> None:
        super().__init__(depth=3, width=4, activation="sigmoid")
        with torch.no_grad():
            self.net.layers[0].weight.fill_(10.0)
            self.net.layers[0].bias.fill_(1000.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_units_pinned_at_a_bound_are_diagnosed_saturated_not_vanishing():
    detector = PlateauDetector(patience=3)
    trainer = quiet_trainer(max_epochs=5, limit_val_batches=0, callbacks=[detector], log_every_n_steps=1)
    trainer.fit(Pinned(), datamodule=Toy2DDataModule())
    stall = detector.events[0]
    assert stall.diagnosis == "saturated_units" and stall.grad_norms["layers.0"] == 0.0
    assert stall.layers["layers.0"]["saturated"] == 1.0 and stall.layers["layers.1"]["saturated"] < 0.9


def test_histograms_reach_tensorboard_ten_times_rarer_than_the_scalars(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, default_hp_metric=False)
    monitor = LayerStatsMonitor(log_every_n_steps=1)
    quiet_trainer(max_steps=12, logger=logger, callbacks=[monitor]).fit(TinyNet(), loader(n=48))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    tags = set(events.Tags()["histograms"])
    assert {"hist_activation/body.0", "hist_gradient/body.3", "hist_weight/body.0"} <= tags
    weights = events.Histograms("hist_weight/body.0")
    assert [h.step for h in weights] == [0, 10]
    assert weights[0].histogram_value.num == 15  # body.0's weight: 5 x 3
