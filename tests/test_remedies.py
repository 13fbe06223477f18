"""Remedies that follow the diagnosis: idle ReLU units found and re-placed, layer-wise steps for
vanishing gradients, and the per-diagnosis policy that picks between them."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from src.callbacks import EscapeAction, PlateauDetector, PlateauEscape
from src.callbacks.escape_actions import trust_ratio_
from src.callbacks.grad_flow import GradProfile, parameter_layers
from src.callbacks.plateau_rule import diagnose
from src.callbacks.units import UnitRecorder, idle_units, replace_units, unit_layers
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import StopAfter, quiet_trainer

EVEN = GradProfile(0, ("a", "b"), (2e-5, 1e-5), (True, True))
DEEP = GradProfile(0, ("a", "b", "c"), (1e-12, 1e-6, 1e-2), (True, True, True))


def found(dead=(), always_on=(), redundant=()) -> dict[str, dict[str, list]]:
    return {"layers.0": {"dead": list(dead), "always_on": list(always_on), "redundant": list(redundant)}}


def test_idle_units_are_dead_always_on_or_a_copy_and_healthy_units_are_none():
    rows = [[1.0, 0.0], [1.0, 2.0], [-1.0, 0.5], [2.0, 4.0], [0.5, -0.1]]
    units = idle_units([0, 10, 4, 7, 3], 10, rows)
    # unit 3 is live and points like unit 1, but unit 1 (always on) is listed already: it is re-placed anyway
    assert units == {"dead": [0], "always_on": [1], "redundant": []}
    assert idle_units([3, 7, 4], 10, [[1.0, 0.0], [-1.0, 0.5], [2.0, 0.01]]) == {
        "dead": [], "always_on": [], "redundant": [[0, 2]],
    }  # fmt: skip
    assert idle_units([3, 7], 10, [[1.0, 0.0], [-1.0, 0.5]]) == {"dead": [], "always_on": [], "redundant": []}


def test_diagnosis_order_vanishing_then_dead_always_on_redundant_then_flat():
    assert diagnose([DEEP], units=found(dead=[0])) == "vanishing"
    assert diagnose([EVEN], units=found(dead=[0], always_on=[1])) == "dead_units"
    assert diagnose([EVEN], units=found(always_on=[1], redundant=[[0, 2]])) == "always_on_units"
    assert diagnose([EVEN], units=found(redundant=[[0, 2]])) == "redundant_units"
    assert diagnose([EVEN], units=found()) == "flat"
    assert diagnose([], units=found(dead=[1])) == "dead_units"
    blocked = GradProfile(0, ("a", "b", "c"), (0.0, 0.0, 1e-2), (True, True, True))  # below a dead layer
    assert diagnose([blocked], units=found(dead=[0, 1])) == "dead_units" and diagnose([blocked]) == "vanishing"
    two_layers = GradProfile(0, ("a", "b"), (1e-9, 1e-2), (True, True))  # no depth for gradients to vanish in
    assert diagnose([two_layers], units=found(dead=[0])) == "dead_units"


def tiny_relu() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([-5.0, 5.0, 0.2]))  # dead on [-1, 1], always on, kink at 0.2
    return net


def test_unit_recorder_counts_active_samples_in_training_only():
    net = tiny_relu()
    recorder = UnitRecorder()
    recorder.bind(net)
    x = torch.linspace(-1, 1, 11)[:, None]
    net(x)
    net(x[:5])
    assert recorder.active["0"].tolist() == [0, 16, 7 + 5] and recorder.samples["0"] == 16
    assert torch.equal(recorder.inputs["0"], x[:5])
    with torch.no_grad():  # validation: not counted
        net(x)
    net.eval()
    net(x)
    assert recorder.samples["0"] == 16
    recorder.reset()
    assert recorder.active == {}
    recorder.close()
    net.train()
    net(x)
    assert recorder.active == {}


def test_unit_layers_only_in_relu_mlps_without_normalisation():
    assert list(unit_layers(MLPClassifier(depth=3, activation="relu"))) == ["net.layers.0", "net.layers.1"]
    assert unit_layers(MLPClassifier(depth=3, activation="sigmoid")) == {}
    assert unit_layers(MLPClassifier(depth=3, activation="relu", batch_norm=True)) == {}


def test_replace_units_puts_the_kink_on_a_data_point_and_resets_their_optimizer_state():
    net = tiny_relu()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.linspace(-1, 1, 11)[:, None]
    net(x).sum().backward()
    optimizer.step()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    state_before = {k: v.clone() for k, v in optimizer.state[net[2].weight].items()}
    replace_units(net[0], net[2], [0, 1], x, optimizer, torch.Generator().manual_seed(0))
    weight, bias = net[0].weight.detach(), net[0].bias.detach()
    kinks = -bias[:2] / weight[:2, 0]
    assert all(torch.isclose(kinks[j], x[:, 0]).any() for j in range(2))  # each kink on a data point
    assert weight[:2].norm(dim=1) == pytest.approx([before["0.weight"][2].norm().item()] * 2)
    assert torch.equal(weight[2], before["0.weight"][2]) and bias[2] == before["0.bias"][2]  # unit 2 untouched
    assert torch.equal(net[2].weight, before["2.weight"])  # outgoing weights kept
    for param, index in ((net[0].weight, [0, 1]), (net[0].bias, [0, 1])):
        assert (optimizer.state[param]["exp_avg"][index] == 0).all()
        assert (optimizer.state[param]["exp_avg_sq"][index] == 0).all()
    assert (optimizer.state[net[0].weight]["exp_avg"][2] != 0).all()
    assert (optimizer.state[net[2].weight]["exp_avg"][:, [0, 1]] == 0).all()
    assert torch.equal(optimizer.state[net[2].weight]["exp_avg"][:, 2], state_before["exp_avg"][:, 2])
    # a re-placed unit is alive on part of the data again
    active = (net[0](x) > 0).sum(0)
    assert 0 < active[0] < len(x) and 0 < active[1] < len(x)


def test_trust_ratio_scales_each_layers_step_to_a_fraction_of_its_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Sigmoid(), nn.Linear(4, 1))
    net(torch.randn(8, 2)).sum().backward()
    with torch.no_grad():
        net[0].weight.grad *= 1e-9  # a vanishing first layer (its bias gradient is not)
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    trust_ratio_(parameter_layers(net), optimizer, 0.01)
    for layer in ("0", "2"):
        weight, bias = net.get_submodule(layer).weight, net.get_submodule(layer).bias
        step = 0.1 * torch.cat([weight.grad.flatten(), bias.grad])
        norm = torch.cat([weight.flatten(), bias]).norm()
        assert step.norm().item() == pytest.approx(0.01 * norm.item(), rel=1e-5)
        factor = weight.grad.norm() / grads[f"{layer}.weight"].norm()
        assert torch.allclose(bias.grad, grads[f"{layer}.bias"] * factor)  # one factor per layer
    # scaled by the weight's gradient alone, the first layer's bias would have stepped 1e9 x too far
    assert 0.1 * net[0].bias.grad.norm() <= 0.01 * torch.cat([net[0].weight.flatten(), net[0].bias]).norm() * 1.0001


def one_layer_at_a_time(layers, lrs: dict[int, float], ratio: float) -> None:
    """trust_ratio_'s rule written out layer by layer: the reference its fused version must equal."""
    for params in layers.values():
        params = [p for p in params if p.grad is not None and id(p) in lrs]
        if not any(p.ndim >= 2 for p in params) or lrs[id(params[0])] <= 0:
            continue
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in params]))
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        lr = lrs[id(params[0])]
        scale = torch.where((norm > 0) & (grad_norm > 0), ratio * norm / (lr * grad_norm), torch.ones_like(grad_norm))
        for param in params:
            param.grad.mul_(scale)


@pytest.mark.parametrize("seed", range(16))
def test_trust_ratio_scales_all_layers_at_once_bit_for_bit_as_one_layer_at_a_time(seed):
    torch.manual_seed(seed)
    # even seeds: layers with and without a bias, and a bias without a gradient (rows of unequal
    # length); all: a layer the optimizer does not hold, a layer whose gradient is zero, gradients
    # from 1 down to 1e-11, two lrs
    ragged = seed % 2 == 0
    net = nn.Sequential(
        nn.Linear(2, 6, bias=not ragged), nn.Sigmoid(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 5),
        nn.Sigmoid(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 1),
    )  # fmt: skip
    net(torch.randn(16, 2)).sum().backward()
    with torch.no_grad():
        for param in net.parameters():
            if param.grad is not None:
                param.grad *= 10.0 ** -float(torch.randint(0, 12, ()))
        net[6].weight.grad.zero_()
        net[6].bias.grad.zero_()
    if ragged:
        net[2].bias.grad = None
    groups = [{"params": list(net[:3].parameters()), "lr": 0.3}, {"params": list(net[6:].parameters())}]
    optimizer = torch.optim.SGD(groups, lr=0.1 if seed < 2 else 0.3)
    before = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    trust_ratio_(parameter_layers(net), optimizer, 0.01)
    fused = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    for param, grad in zip(net.parameters(), before, strict=True):
        param.grad = None if grad is None else grad.clone()
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    one_layer_at_a_time(parameter_layers(net), lrs, 0.01)
    for param, got in zip(net.parameters(), fused, strict=True):
        assert (got is None and param.grad is None) or torch.equal(got, param.grad)
    at = [name for name, _ in net.named_parameters()].index
    assert not torch.equal(fused[at("0.weight")], before[at("0.weight")])  # scaled
    for left_alone in ("6.weight", "4.weight"):  # a zero gradient; a layer outside the optimizer
        assert torch.equal(fused[at(left_alone)], before[at(left_alone)])


def test_policy_picks_the_diagnosis_list_then_any_and_repeats_what_repeats():
    escape = PlateauEscape(
        actions={
            "vanishing": [{"trust_ratio": 0.01}],
            "dead_units": [{"replace_units": True, "repeat": True}],
            "any": [{"momentum": 0.9}],
        }  # fmt: skip
    )
    assert escape.next_action("vanishing")[1].trust_ratio == 0.01
    escape.spent_by["vanishing"] = 1
    assert escape.next_action("vanishing") == ("any", EscapeAction(momentum=0.9))
    escape.spent_by["dead_units"] = 5
    assert escape.next_action("dead_units") == ("dead_units", EscapeAction(replace_units=True, repeat=True))
    escape.spent_by["any"] = 1
    assert escape.next_action("flat") is None and escape.next_action("vanishing") is None
    assert PlateauEscape(actions=[{"momentum": 0.9}]).actions == {"any": [EscapeAction(momentum=0.9)]}
    restored = PlateauEscape(actions=escape.actions)
    escape.trust_ratio, escape.raised_at = 0.01, 0.69
    restored.load_state_dict(escape.state_dict())
    assert restored.state_dict() == escape.state_dict() and restored.next_action("flat") is None


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        ({"vanishin": [{"trust_ratio": 0.01}]}, "unknown diagnosis ['vanishin']"),
        ({"vanishing": [{"trust_ratio": 2}]}, "trust_ratio must be in (0, 1)"),
        ([{"repeat": True}], "must set momentum, nesterov, lr_factor, eps, trust_ratio, replace_units or recycle"),
        ([{"recycle": "maybe"}], "escape action recycle must be true or false, got 'maybe'"),
    ],
)
def test_bad_policies_are_named(actions, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PlateauEscape(actions=actions)


class AdamNet(MLPClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.RMSprop])
def test_layer_wise_steps_rescale_the_step_any_optimizer_took(optimizer):
    from src.callbacks.escape_actions import trust_update_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 1))
    opt = optimizer(net.parameters(), lr=1e-3)
    layers = parameter_layers(net)
    net(torch.randn(8, 3)).pow(2).mean().backward()
    before = {id(p): p.detach().clone() for p in net.parameters()}
    opt.step()
    optimizers_own = [p.detach().clone() for p in layers["2"]]
    trust_update_(layers, before, 0.01)
    for name, params in layers.items():
        old = torch.cat([before[id(p)].flatten() for p in params])
        step = torch.cat([p.detach().flatten() for p in params]) - old
        if name == "2":  # the LayerNorm: no weight matrix, its step stays the optimizer's own
            assert all(torch.equal(p, q) for p, q in zip(layers["2"], optimizers_own, strict=True))
        else:
            assert step.norm().item() == pytest.approx(0.01 * old.norm().item(), rel=1e-4)


def deep_sigmoid_run(tmp_path, epochs: int, **kwargs):
    L.seed_everything(0, verbose=False)
    detector = PlateauDetector(patience=50, good_enough=0.01)
    escape = PlateauEscape()
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, log_every_n_steps=10, default_root_dir=tmp_path, deterministic=True,
        callbacks=[detector, escape, *kwargs.pop("callbacks", [])], **kwargs,
    )  # fmt: skip
    model = MLPClassifier(depth=18, activation="sigmoid")
    return trainer, model, detector, escape


@pytest.mark.slow
def test_the_default_policy_gets_a_depth_18_sigmoid_net_out_with_layer_wise_steps(tmp_path):
    trainer, model, detector, escape = deep_sigmoid_run(tmp_path, 600)
    trainer.fit(model, datamodule=Toy2DDataModule())
    assert detector.events[0].diagnosis == "vanishing"
    assert detector.events[0].actions[0].action == "momentum 0.9, layer-wise steps of 0.001 x |W|"
    assert trainer.callback_metrics["train/loss"] < 0.05
    undone = [a.action for e in detector.events for a in e.actions if "layer-wise steps off" in a.action]
    assert len(undone) == 1 and escape.trust_ratio is None


@pytest.mark.slow
def test_resume_with_layer_wise_steps_in_force_matches_an_uninterrupted_run(tmp_path):
    # stalled at epoch 91: the steps have the 50 epochs (the patience) to be judged that the fit's end leaves them
    straight_trainer, straight, *_ = deep_sigmoid_run(tmp_path / "a", 142)
    straight_trainer.fit(straight, datamodule=Toy2DDataModule())
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first, model, _, escape = deep_sigmoid_run(
        tmp_path / "b", 142, callbacks=[checkpoint, StopAfter(99)], enable_checkpointing=True
    )
    first.fit(model, datamodule=Toy2DDataModule())
    assert escape.trust_ratio == 0.001  # in force when the run stopped (with momentum 0.9)
    resumed, resumed_model, _, resumed_escape = deep_sigmoid_run(tmp_path / "b", 142)
    resumed.fit(resumed_model, datamodule=Toy2DDataModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed_escape.state_dict()["spent_by"] == {"vanishing": 1}
    for a, b in zip(resumed_model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_dead_unit_in_the_dnnex_net_is_found_and_re_placed(tmp_path):
    from src.data import DnnexDataModule

    L.seed_everything(0, verbose=False)
    model = MLPClassifier(in_features=1, num_classes=2, depth=2, width=2, activation="relu")
    with torch.no_grad():  # unit 0: dead on [-1, 1]; unit 1: kink at 0
        model.net.layers[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        model.net.layers[0].bias.copy_(torch.tensor([-3.0, 0.0]))
    detector = PlateauDetector(patience=3, min_delta=0.5)  # a scripted stall: no epoch improves by half
    escape = PlateauEscape(actions={"dead_units": [{"replace_units": True, "repeat": True}]})
    trainer = quiet_trainer(max_epochs=7, callbacks=[detector, escape], default_root_dir=tmp_path, limit_val_batches=0)
    dm = DnnexDataModule(n_samples=200)  # a full batch: the stall at epoch 3 has its 3 epochs to be judged
    trainer.fit(model, datamodule=dm)
    stall = detector.events[0]
    assert stall.diagnosis == "dead_units" and stall.units["net.layers.0"]["dead"] == [0]
    assert stall.actions[0].action == "re-place idle units: net.layers.0 [0]"
    x = dm.train_set.tensors[0]
    with torch.no_grad():
        active = (model.net.layers[0](x)[:, 0] > 0).sum().item()
    assert 0 < active < len(x)  # alive again, with its kink inside the data


def test_a_run_that_never_stalls_is_bit_identical_with_and_without_the_policy(tmp_path):
    def fit(callbacks) -> torch.Tensor:
        L.seed_everything(0, verbose=False)
        model = MLPClassifier(depth=3, activation="relu")
        trainer = quiet_trainer(max_epochs=60, callbacks=callbacks, default_root_dir=tmp_path, deterministic=True)
        trainer.fit(model, datamodule=Toy2DDataModule())
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    detector = PlateauDetector(patience=100)
    with_policy = fit([detector, PlateauEscape()])
    assert not detector.events
    assert torch.equal(with_policy, fit([PlateauDetector(patience=100)]))
    assert torch.equal(with_policy, fit([]))


def test_a_run_of_dead_layers_comes_back_in_one_action(tmp_path):
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(depth=4, width=6, activation="relu")
    with torch.no_grad():  # the first two hidden layers dead on every point: the rest sees only zeros
        for layer in model.net.layers[:2]:
            layer.bias.fill_(-100.0)
    detector = PlateauDetector(patience=2, min_delta=0.5)  # a scripted stall
    escape = PlateauEscape(actions={"dead_units": [{"replace_units": True}]})
    trainer = quiet_trainer(max_epochs=5, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    dm = Toy2DDataModule()  # the stall at epoch 2 has its 2 epochs to be judged
    trainer.fit(model, datamodule=dm)
    assert detector.events[0].diagnosis == "dead_units"
    assert set(detector.events[0].units) == {"net.layers.0", "net.layers.1", "net.layers.2"}
    h = dm.train_set.tensors[0]
    for layer in model.net.layers[:3]:  # every hidden layer has live units after the one action
        pre = layer(h)
        assert ((pre > 0).sum(0) > 0).any(), layer
        h = torch.relu(pre)


def test_resume_after_re_placements_matches_an_uninterrupted_run(tmp_path):
    """Stalls every 3 epochs, each re-placing idle units (one before the checkpoint, one after):
    the new kinks (drawn from the step count), the optimizer state and the policy all resume."""
    from src.data import DnnexDataModule

    def run(root, max_epochs, callbacks=(), ckpt_path=None):
        L.seed_everything(0, verbose=False)
        model = MLPClassifier(in_features=1, num_classes=2, depth=2, width=4, activation="relu")
        with torch.no_grad():  # units 0 and 1 dead on [-1, 1], unit 2 always on
            model.net.layers[0].weight.copy_(torch.tensor([[1.0], [1.0], [1.0], [1.0]]))
            model.net.layers[0].bias.copy_(torch.tensor([-3.0, -2.0, 2.0, 0.0]))
        detector = PlateauDetector(patience=3, min_delta=0.5)  # a scripted stall: no epoch improves by half
        # the scripted stalls bring no gain: without probation=None the second re-placement is withdrawn
        escape = PlateauEscape(actions={"any": [{"replace_units": True, "repeat": True}]}, probation=None)
        trainer = quiet_trainer(
            max_epochs=max_epochs, callbacks=[detector, escape, *callbacks], default_root_dir=root,
            limit_val_batches=0, deterministic=True, enable_checkpointing=bool(callbacks),
        )  # fmt: skip
        trainer.fit(model, datamodule=DnnexDataModule(n_samples=200), ckpt_path=ckpt_path)
        return model, detector

    straight, detector = run(tmp_path / "a", 11)  # stalls at epochs 3 and 7, each with its 3 epochs to be judged
    replaced = [a.action for e in detector.events for a in e.actions]
    assert len(replaced) == 2 and replaced[0].startswith("re-place idle units: net.layers.0 [0, 1, 2")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run(tmp_path / "b", 11, callbacks=[checkpoint, StopAfter(4)])
    resumed, resumed_detector = run(tmp_path / "b", 11, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [a.action for e in resumed_detector.events for a in e.actions] == replaced
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_two_units_with_one_kink_are_named_redundant_and_one_is_re_placed(tmp_path):
    from src.data import DnnexDataModule

    L.seed_everything(0, verbose=False)
    model = MLPClassifier(in_features=1, num_classes=2, depth=2, width=2, activation="relu")
    with torch.no_grad():  # both units: kink at x = 0, rising: one unit's worth of curve
        model.net.layers[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
        model.net.layers[0].bias.copy_(torch.tensor([0.0, 0.0]))
    detector = PlateauDetector(patience=3, min_delta=0.5)  # a scripted stall: no epoch improves by half
    escape = PlateauEscape(actions={"redundant_units": [{"replace_units": True}]})
    trainer = quiet_trainer(max_epochs=7, callbacks=[detector, escape], default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(model, datamodule=DnnexDataModule(n_samples=200))  # the stall at epoch 3 has its 3 epochs
    stall = detector.events[0]
    assert stall.diagnosis == "redundant_units" and stall.units["net.layers.0"]["redundant"] == [[0, 1]]
    assert stall.actions[0].action == "re-place idle units: net.layers.0 [1]"
    weight, bias = model.net.layers[0].weight.detach().flatten(), model.net.layers[0].bias.detach()
    kinks = -bias / weight
    assert abs(kinks[0] - kinks[1]) > 1e-3 and -1 <= kinks[1] <= 1  # the new one is elsewhere in the data
