"""The MLP and the LightningModule: its shapes, losses and the metrics it logs."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from src.data import Toy2DDataModule
from src.models import MLP, MLPClassifier
from src.models.mlp import ACTIVATIONS, hidden_widths
from tests.helpers import MemoryLogger, quiet_trainer


@pytest.mark.parametrize("depth", [1, 2, 7, 18])
def test_depth_counts_linear_layers_named_in_order(depth):
    net = MLP(2, 1, depth=depth, width=10)
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    assert names == [f"layers.{i}" for i in range(depth)]
    assert net(torch.randn(5, 2)).shape == (5, 1)


def test_width_list_sets_each_hidden_layer():
    net = MLP(784, 10, depth=3, width=[256, 128])
    assert [(layer.in_features, layer.out_features) for layer in net.layers] == [(784, 256), (256, 128), (128, 10)]


@pytest.mark.parametrize(("depth", "width"), [(0, 10), (3, 0), (3, [10]), (3, [10, -1])])
def test_bad_shapes_are_rejected_naming_the_argument(depth, width):
    with pytest.raises(ValueError, match="depth|width"):
        hidden_widths(depth, width)


# Each name's function, written out: what a user expects the config's name to mean.
BY_HAND = {
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
    "relu": lambda x: torch.where(x > 0, x, 0.0),
    "leaky_relu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "elu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "gelu": lambda x: x * 0.5 * (1 + torch.erf(x / 2**0.5)),
    "selu": lambda x: 1.0507009873554805 * torch.where(x > 0, x, 1.6732632423543772 * (torch.exp(x) - 1)),
}


def test_every_activation_name_is_covered_by_hand():
    assert set(BY_HAND) == set(ACTIVATIONS)


@pytest.mark.parametrize("activation", sorted(BY_HAND))
def test_activation_is_the_named_function_between_layers(activation):
    net = MLP(2, 1, depth=3, width=4, activation=activation)
    x = torch.randn(3, 2, dtype=torch.float64)
    net = net.double()
    f = BY_HAND[activation]
    expected = net.layers[2](f(net.layers[1](f(net.layers[0](x)))))
    torch.testing.assert_close(net(x), expected)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        MLP(2, 1, depth=2, width=4, activation="swish")


@pytest.mark.parametrize(
    ("init", "std"),
    [("normal", 1.0), ("kaiming_normal", (2 / 400) ** 0.5), ("xavier_normal", (2 / 800) ** 0.5)],
)
def test_init_sets_the_weight_scale_and_zero_bias(init, std):
    torch.manual_seed(0)
    net = MLP(400, 400, depth=1, width=[], activation="tanh" if init != "xavier_normal" else "elu", init=init)
    weight = net.layers[0].weight
    assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(net.layers[0].bias == 0)


def test_default_init_keeps_pytorch_bias():
    net = MLP(400, 400, depth=1, width=[], init="default")
    assert net.layers[0].bias.abs().sum() > 0


def test_batch_norm_and_dropout_are_inserted():
    net = MLP(2, 1, depth=3, width=8, batch_norm=True, dropout=0.5)
    assert [type(m) for m in net.norms] == [nn.BatchNorm1d, nn.BatchNorm1d]
    assert isinstance(net.dropout, nn.Dropout) and net.dropout.p == 0.5
    net.train()
    assert net(torch.randn(16, 2)).shape == (16, 1)


def test_binary_uses_one_logit_and_bce():
    model = MLPClassifier(in_features=2, num_classes=2, depth=3, width=4)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    logits = model(x)
    assert logits.shape == (6,)
    assert isinstance(model.loss_fn, nn.BCEWithLogitsLoss)
    loss = model.training_step((x, y), 0)
    torch.testing.assert_close(loss, nn.functional.binary_cross_entropy_with_logits(logits, y.float()))


def test_multiclass_uses_one_logit_per_class_and_cross_entropy():
    model = MLPClassifier(in_features=2, num_classes=4, depth=3, width=4)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 1, 0])
    logits = model(x)
    assert logits.shape == (6, 4)
    loss = model.training_step((x, y), 0)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y))
    torch.testing.assert_close(model.predict_proba(x).sum(-1), torch.ones(6))


def test_a_checkpoint_reloads_the_same_net_without_its_arguments(tmp_path):
    model = MLPClassifier(in_features=3, num_classes=5, depth=4, width=[8, 6, 7], activation="tanh", batch_norm=True)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = MLPClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    x = torch.randn(4, 3)
    model.eval()
    reloaded.eval()
    torch.testing.assert_close(reloaded(x), model(x))
    assert reloaded.hparams.width == [8, 6, 7] and reloaded.hparams.activation == "tanh"


class EpochEndProbe(L.Callback):
    """What a callback sees in ``trainer.callback_metrics`` at each ``on_train_epoch_end``."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        self.seen.append((float(metrics["train/loss"]), float(metrics["train/acc"])))


@pytest.mark.parametrize("num_classes", [2, 4])
def test_train_metrics_are_the_epoch_mean_over_samples_with_an_uneven_last_batch(num_classes):
    # 20 points in batches of 8, 8, 4 and lr 0: the epoch's train/loss must be the mean of the 20
    # per-sample losses (a mean of the 3 batch means would weigh the last 4 points double).
    dm = Toy2DDataModule(variant="two_clusters" if num_classes == 2 else "blobs", n_samples=20, batch_size=8)
    model = MLPClassifier(in_features=2, num_classes=num_classes, depth=3, width=8)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)
    probe = EpochEndProbe()
    quiet_trainer(max_epochs=2, callbacks=[probe], limit_val_batches=0).fit(model, datamodule=dm)
    x, y = dm.train_set.tensors
    with torch.no_grad():
        logits = model(x)
    if num_classes == 2:
        losses = nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="none")
        correct = (logits > 0).long() == y
    else:
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        correct = logits.argmax(-1) == y
    batch_means = torch.stack([chunk.mean() for chunk in losses.split(8)]).mean()
    assert not torch.isclose(losses.mean(), batch_means, rtol=1e-4)  # the test can tell the two apart
    for loss, acc in probe.seen:  # each epoch starts afresh: both epochs give the same values
        assert loss == pytest.approx(float(losses.mean()), rel=1e-5)
        assert acc == pytest.approx(float(correct.float().mean()))


def test_callbacks_see_the_current_epochs_train_metrics_and_the_logger_gets_one_value_per_epoch():
    # Logged once per epoch, at the epoch's last batch in training_step:
    # a callback's on_train_epoch_end must see this epoch's value, not the previous one's.
    dm = Toy2DDataModule(n_samples=20, batch_size=5)
    model = MLPClassifier(in_features=2, num_classes=2, depth=2, width=8)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.5)
    probe, logger = EpochEndProbe(), MemoryLogger()
    trainer = quiet_trainer(max_epochs=5, callbacks=[probe], logger=logger, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, datamodule=dm)
    logged = [value for _, value in logger.metrics["train/loss"]]
    assert len(logged) == 5 and len(set(logged)) == 5  # one value per epoch, and training moved it
    assert [loss for loss, _ in probe.seen] == pytest.approx(logged)
    assert [acc for _, acc in probe.seen] == pytest.approx([value for _, value in logger.metrics["train/acc"]])


def test_an_epoch_cut_short_by_max_steps_still_logs_its_train_metrics():
    # 20 points in batches of 8, 8, 4 with max_steps=2: the epoch ends after 2 of its 3 batches, so
    # it never reaches its last batch; the module logs the 16 samples it saw at the epoch end.
    class BatchLosses(L.Callback):
        seen: list[tuple[float, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seen.append((float(outputs["loss"]), len(batch[0])))

    dm = Toy2DDataModule(n_samples=20, batch_size=8)
    model = MLPClassifier(in_features=2, num_classes=2, depth=2, width=8)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)
    probe, logger = BatchLosses(), MemoryLogger()
    quiet_trainer(max_steps=2, callbacks=[probe], logger=logger, limit_val_batches=0).fit(model, datamodule=dm)
    assert [n for _, n in probe.seen] == [8, 8]
    expected = sum(loss * n for loss, n in probe.seen) / 16
    assert [value for _, value in logger.metrics["train/loss"]] == pytest.approx([expected], rel=1e-5)


def test_a_nan_loss_reaches_train_loss():
    dm = Toy2DDataModule(n_samples=20)
    model = MLPClassifier(in_features=2, num_classes=2, depth=2, width=4)
    with torch.no_grad():
        model.net.layers[0].weight.fill_(float("nan"))
    probe = EpochEndProbe()
    quiet_trainer(max_epochs=1, callbacks=[probe], limit_val_batches=0).fit(model, datamodule=dm)
    assert math.isnan(probe.seen[0][0])
