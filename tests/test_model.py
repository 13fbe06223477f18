"""The MLP and the LightningModule, without a Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.models import MLP, MLPClassifier
from src.models.mlp import ACTIVATIONS, hidden_widths


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


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_is_used_between_layers(activation):
    net = MLP(2, 1, depth=3, width=4, activation=activation)
    assert isinstance(net.activation, ACTIVATIONS[activation])
    x = torch.randn(3, 2)
    hidden = net.activation(net.layers[0](x))
    expected = net.layers[2](net.activation(net.layers[1](hidden)))
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


def test_hyperparameters_are_saved_for_checkpoint_reload():
    model = MLPClassifier(in_features=3, num_classes=5, depth=4, width=[8, 8, 8], activation="tanh")
    assert model.hparams.depth == 4 and model.hparams.activation == "tanh" and model.hparams.num_classes == 5
