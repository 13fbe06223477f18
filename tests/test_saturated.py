"""Units of a bounded activation pinned at a bound: found, diagnosed and re-placed (ReDo's rule)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from src.callbacks import PlateauDetector, PlateauEscape
from src.callbacks.escape_units import replace_stall_units
from src.callbacks.events import load_events
from src.callbacks.saturated import PinnedUnits, plain_mlp
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import REPO, StopAfter, quiet_trainer, run_cli

CONFIGS = REPO / "configs"

XOR = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


def pinned_xor_net(seed: int = 0) -> MLPClassifier:
    """The lab's 2-2-1 sigmoid net with hidden unit 1 pinned at 1 on every input (pre-activation 30)."""
    L.seed_everything(seed, verbose=False)
    model = MLPClassifier(depth=2, width=2, activation="sigmoid")
    with torch.no_grad():
        model.net.layers[0].weight[1] = torch.tensor([0.5, -0.5])
        model.net.layers[0].bias[1] = 30.0
    return model


def test_plain_mlps_of_any_activation_are_found_and_a_relu_net_has_no_pinned_units():
    assert list(plain_mlp(MLPClassifier(depth=3, activation="relu"))[0]) == ["net.layers.0", "net.layers.1"]
    assert list(plain_mlp(MLPClassifier(depth=3, activation="tanh"))[0]) == ["net.layers.0", "net.layers.1"]
    assert plain_mlp(MLPClassifier(depth=3, activation="gelu", batch_norm=True)) is None
    assert plain_mlp(MLPClassifier(depth=3, activation="sigmoid", batch_norm=True)) is None
    mixed = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    assert plain_mlp(mixed) is None
    model = MLPClassifier(depth=2, width=2, activation="relu")
    with torch.no_grad():
        model.net.layers[0].bias.fill_(30.0)  # always on: far from a bound only a bounded unit has
    pinned = PinnedUnits()
    pinned.bind(model)
    model(XOR)
    assert pinned.find() == {} and list(pinned.weakest()) == ["net.layers.0"]


def test_the_weakest_unit_is_the_one_the_next_layer_gets_least_from():
    """Utility = spread of the unit's output over the inputs x norm of its outgoing weights."""
    model = MLPClassifier(depth=3, width=3, activation="tanh")
    first, second, last = model.net.layers
    with torch.no_grad():
        for layer in (first, second, last):
            layer.weight.fill_(0.0)
            layer.bias.fill_(0.0)
        first.weight[:, 0] = torch.tensor([1.0, 2.0, 0.5])  # layer 0: tanh(x0), tanh(2 x0), tanh(x0 / 2)
        second.weight[:, 0] = torch.tensor([1.0, 1.0, 0.1])  # how layer 1 reads layer 0's unit 0...
        second.weight[:, 1] = torch.tensor([1.0, 1.0, 1.0])  # ...its unit 1...
        second.weight[:, 2] = torch.tensor([1.0, 1.0, 1.0])  # ...and its unit 2
        first.bias[1] = 30.0  # layer 0's unit 1 is constant: no spread, however much it is read
        last.weight[0] = torch.tensor([1.0, 0.01, 1.0])  # layer 1's units 0 and 1 are alike; 1 is read least
    pinned = PinnedUnits()
    pinned.bind(model)
    model(XOR)
    assert pinned.weakest() == {"net.layers.0": [1], "net.layers.1": [1]}
    with torch.no_grad():
        first.bias[1] = 0.0  # unit 1 varies again...
        second.weight[:, 1] = 10.0  # ...and is read x10: the weakest is now the one by hand below (unit 2)
    model(XOR)
    spreads = torch.tanh(XOR[:, :1] * torch.tensor([1.0, 2.0, 0.5])).std(0, correction=0)
    reads = second.weight.norm(dim=0).detach()
    assert pinned.weakest()["net.layers.0"] == [int((spreads * reads).argmin())] == [2]


@pytest.mark.parametrize("stale", [False, True])
def test_units_found_on_weights_rolled_back_since_are_found_again_before_they_are_re_placed(stale):
    """A stall names unit 0 pinned; the weights it was found on are gone (a harmful action rolled
    back), and on the weights now it is unit 1 that is pinned: unit 1 is the one re-placed."""
    model = pinned_xor_net()
    detector = PlateauDetector()
    detector.units.bind(model)
    detector.pinned.bind(model)
    model(XOR)
    trainer = SimpleNamespace(world_size=1, optimizers=[], global_step=0)
    found_before = {"net.layers.0": {"dead": [], "always_on": [], "redundant": [], "saturated": [0]}}
    replaced = replace_stall_units(trainer, model, detector, found_before, stale=stale)
    assert replaced == (": net.layers.0 [1]" if stale else ": net.layers.0 [0]")


def test_idle_relu_units_found_on_weights_rolled_back_since_are_re_placed_as_found():
    """Idle ReLU units are counted over an epoch, not found again: a re-placed unit that died again is
    dead on the weights gone back to as well (the dnnex nets' re-placements after a rollback)."""
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(depth=2, width=3, activation="relu")
    detector = PlateauDetector()
    detector.units.bind(model)
    detector.pinned.bind(model)
    model.train()
    model(XOR)
    trainer = SimpleNamespace(world_size=1, optimizers=[], global_step=0)
    found_before = {"net.layers.0": {"dead": [2], "always_on": [], "redundant": []}}
    assert replace_stall_units(trainer, model, detector, found_before, stale=True) == ": net.layers.0 [2]"


@pytest.mark.slow
def test_a_local_minimum_with_no_idle_unit_is_left_by_re_placing_the_weakest_unit(tmp_path):
    """The lab's XOR net, seed 5, trained by plain SGD into its local minimum (loss 0.347: both hidden
    units at 1 on (1, 0) and (1, 1)), then fitted on with one action, ``recycle``: it learns XOR."""
    torch.manual_seed(5)
    model = MLPClassifier(depth=2, width=2, activation="sigmoid")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    for _ in range(5000):
        optimizer.zero_grad()
        model.loss_fn(model(XOR), labels).backward()
        optimizer.step()
    stuck = model.loss_fn(model(XOR), labels).item()
    assert stuck == pytest.approx(0.347, abs=0.003)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1.0)
    detector = PlateauDetector(patience=100, good_enough=0.01)
    trainer = quiet_trainer(
        max_epochs=2000, callbacks=[detector, PlateauEscape(actions=[{"recycle": True}])], default_root_dir=tmp_path,
        limit_val_batches=0, deterministic=True,
    )  # fmt: skip
    trainer.fit(model, datamodule=Toy2DDataModule(variant="xor4", n_samples=4))
    actions = [a.action for e in detector.events for a in e.actions]
    assert actions[0].startswith("re-place each layer's weakest unit: net.layers.0 ["), actions
    assert model.loss_fn(model(XOR), labels).item() < 0.05


def test_a_pinned_unit_is_found_on_the_training_inputs_only():
    model = pinned_xor_net()
    pinned = PinnedUnits()
    pinned.bind(model)
    with torch.no_grad():
        model(XOR)  # no gradient: not a training step, nothing kept
    assert pinned.find() == {}
    model(XOR)
    assert pinned.find() == {"net.layers.0": [1]}
    pinned.close()
    assert pinned.find() == {}


def test_a_unit_saturated_on_most_inputs_is_pinned_but_only_one_on_every_input_is_a_diagnosis_alone():
    """Unit 1 is at 1 on 19 of 20 inputs (a feature for the 20th): found at the default share of
    0.9, not at 1.0; where the gradients say nothing else, only a unit pinned on every input makes
    the stall ``saturated_units``."""
    from src.callbacks.grad_flow import GradProfile
    from src.callbacks.plateau_rule import diagnose

    model = MLPClassifier(depth=2, width=2, activation="sigmoid")
    with torch.no_grad():
        model.net.layers[0].weight[1] = torch.tensor([-100.0, 0.0])
        model.net.layers[0].bias[1] = 50.0  # at 1 where x0 = 0
    inputs = torch.cat([torch.zeros(19, 2), torch.tensor([[0.5, 0.0]])])  # the 20th at 0.5
    pinned = PinnedUnits()
    pinned.bind(model)
    model(inputs)
    assert pinned.find() == {"net.layers.0": [1]} and pinned.find(share=1.0) == {}
    lab = GradProfile(0, ("a", "b"), (0.02, 0.03), (True, True))
    units = {"net.layers.0": {"saturated": [1]}}
    assert diagnose([lab], units=units, pinned_everywhere=False) == "unclear"
    assert diagnose([lab], units=units, pinned_everywhere=True) == "saturated_units"


@pytest.mark.parametrize("last_input, diagnosis", [(0.0, "saturated_units"), (0.5, "unclear")])
def test_a_stall_is_saturated_units_by_elimination_only_for_a_unit_pinned_on_every_input(
    tmp_path, last_input, diagnosis
):
    """A scripted stall of a 2-2-1 sigmoid net (two weight layers: never ``vanishing``) whose unit 1
    is at 1 on 19 of its 20 training inputs, and on the 20th too or not."""
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(0, verbose=False)
    model = MLPClassifier(depth=2, width=2, activation="sigmoid")
    with torch.no_grad():
        model.net.layers[0].weight[1] = torch.tensor([-100.0, 0.0])
        model.net.layers[0].bias[1] = 50.0
    inputs = torch.cat([torch.zeros(19, 2), torch.tensor([[last_input, 0.0]])])
    data = DataLoader(TensorDataset(inputs, torch.arange(20) % 2), batch_size=20)
    detector = PlateauDetector(patience=3, min_delta=0.5)
    trainer = quiet_trainer(max_epochs=4, callbacks=[detector], default_root_dir=tmp_path, deterministic=True)
    trainer.fit(model, train_dataloaders=data)
    event = detector.events[0]
    assert event.units == {"net.layers.0": {"saturated": [1]}}  # found on 90% of the inputs either way
    assert event.diagnosis == diagnosis


def test_re_placing_keeps_what_the_net_computes_and_starts_the_unit_in_its_live_range():
    model = pinned_xor_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.loss_fn(model(XOR), torch.tensor([0.0, 1.0, 1.0, 0.0])).backward()
    optimizer.step()  # Adam's moments are now non-zero everywhere
    pinned = PinnedUnits()
    pinned.bind(model)
    before = model(XOR).detach()
    layer, reader = model.net.layers
    replaced = pinned.replace({"net.layers.0": [1]}, [optimizer], torch.Generator().manual_seed(0))
    assert replaced == ["net.layers.0 [1]"]
    torch.testing.assert_close(model(XOR).detach(), before, atol=1e-6, rtol=0)  # the unit's 1 moved into the bias
    pre = (XOR @ layer.weight[1] + layer.bias[1]).detach()
    assert pre.std().item() == pytest.approx(1.0, abs=1e-5)  # in the sigmoid's live range
    assert pre.abs().min().item() < 1e-6  # centred on one of the inputs
    assert reader.weight[:, 1].abs().max() == 0 and reader.weight[:, 0].abs().max() > 0
    assert optimizer.state[layer.weight]["exp_avg"][1].abs().max() == 0
    assert optimizer.state[layer.weight]["exp_avg"][0].abs().max() > 0
    assert optimizer.state[reader.weight]["exp_avg_sq"][:, 1].abs().max() == 0
    assert pinned.find() == {}


def scripted(model: MLPClassifier, max_epochs: int, root, callbacks=(), ckpt_path=None, actions=None):
    """Stalls every 3 epochs (no epoch improves the loss by half), each answered by the default policy
    (or ``actions``)."""
    detector = PlateauDetector(patience=3, min_delta=0.5)
    escape = PlateauEscape(actions=actions)
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=[detector, escape, *callbacks], default_root_dir=root,
        limit_val_batches=0, deterministic=True, enable_checkpointing=bool(callbacks),
    )  # fmt: skip
    trainer.fit(model, datamodule=Toy2DDataModule(variant="xor4"), ckpt_path=ckpt_path)
    return detector


def test_a_pinned_unit_is_diagnosed_and_re_placed_by_the_default_policy(tmp_path):
    detector = scripted(pinned_xor_net(), 7, tmp_path)  # the stall at epoch 3 has its 3 epochs to be judged
    event = detector.events[0]
    assert event.diagnosis == "saturated_units" and event.units == {"net.layers.0": {"saturated": [1]}}
    assert [a.action for a in event.actions] == ["re-place idle units: net.layers.0 [1]"]


def test_resume_after_re_placing_pinned_units_matches_an_uninterrupted_run(tmp_path):
    straight = pinned_xor_net()
    detector = scripted(straight, 11, tmp_path / "a")
    actions = [a.action for e in detector.events for a in e.actions]
    # epoch 3: re-placed; epoch 7 (the checkpoint is between): its probation is judged (no gain, a
    # repeating action's first: kept), and the stall, no longer of pinned units, gets the any list's first;
    # epoch 10, the last: that is withdrawn for no gain, and it is too late for another
    assert actions[:2] == ["re-place idle units: net.layers.0 [1]", "momentum 0.9"], actions
    assert len(actions) == 4 and actions[3].startswith("none: 0 steps left"), actions
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    scripted(pinned_xor_net(), 11, tmp_path / "b", callbacks=[checkpoint, StopAfter(4)])
    resumed = pinned_xor_net()
    checkpointed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert any((state.get("snapshot") or {}).get("action") == "re-place idle units" for state in checkpointed.values())
    resumed_detector = scripted(resumed, 11, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [a.action for e in resumed_detector.events for a in e.actions] == actions
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_after_re_placing_the_weakest_units_matches_an_uninterrupted_run(tmp_path):
    policy = [{"recycle": True, "trust_ratio": 0.01, "momentum": 0.0, "repeat": True}]
    straight = MLPClassifier(depth=3, width=4, activation="tanh")
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    detector = scripted(straight, 11, tmp_path / "a", actions=policy)  # stalls at epochs 3 and 7, each judged
    actions = [a.action for e in detector.events for a in e.actions]
    assert len(actions) == 2 and all("re-place each layer's weakest unit: net.layers.0 [" in a for a in actions)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_half = MLPClassifier(depth=3, width=4, activation="tanh")
    first_half.load_state_dict(start)
    scripted(first_half, 11, tmp_path / "b", callbacks=[checkpoint, StopAfter(4)], actions=policy)
    resumed = MLPClassifier(depth=3, width=4, activation="tanh")
    resumed_detector = scripted(resumed, 11, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "last.ckpt", actions=policy)
    assert [a.action for e in resumed_detector.events for a in e.actions] == actions
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_labs_stuck_xor_seed_learns_with_the_default_config(tmp_path):
    """Seed 5 of the lab's XOR (2-2-1 sigmoid, SGD lr 1.0) ends at 0.347 without help (see
    configs/study/xor_seeds.yaml). The detector's step rule, over 2 x patience epochs, sees its slow
    approach to that minimum at epoch 1219 (the epoch rule counts it as improvement until epoch
    ~4600; a 500-epoch window saw it at 1899); with the default policy, once
    momentum 0.9 has brought nothing, each layer's weakest unit is re-placed and it learns XOR (all
    six stuck seeds do)."""
    result = run_cli(
        "fit", "--config", str(CONFIGS / "xor.yaml"), "--seed_everything", "5",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "re-place each layer's weakest unit: net.layers.0" in result.stdout, result.stdout[-3000:]
    loss = float(result.stdout.split("train loss ")[1].split(",")[0])
    assert loss < 0.05, result.stdout[-2000:]
    events = load_events(tmp_path / "lightning_logs" / "version_0" / "stall_events.json")
    assert 1000 < events[0].epoch < 1500, [(e.epoch, e.diagnosis) for e in events]


@pytest.mark.parametrize("frozen_by", ["requires_grad", "the optimizer"])
@pytest.mark.parametrize("weakest", [False, True])
def test_units_of_a_frozen_layer_or_read_by_one_are_left_alone(frozen_by, weakest):
    """A project that freezes layers (a pretrained part): a re-placement there would change weights it keeps
    as they are, and a unit whose reader is frozen would stay cut off (its outgoing weights zeroed)."""
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(depth=4, width=3, activation="relu")
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    frozen = layers[1]  # layer 0's reader: units of layers 0 and 1 stay
    if frozen_by == "requires_grad":
        frozen.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in frozen.parameters())]
    detector = PlateauDetector()
    detector.units.bind(model)
    detector.pinned.bind(model)
    model.train()
    model(XOR)
    before = [layer.weight.detach().clone() for layer in layers]
    trainer = SimpleNamespace(world_size=1, optimizers=[torch.optim.SGD(trained, lr=0.1)], global_step=0)
    found = {f"net.layers.{i}": {"dead": [0], "always_on": [], "redundant": []} for i in range(3)}
    replaced = replace_stall_units(trainer, model, detector, found, weakest=weakest)
    assert replaced.startswith(": net.layers.2 [")
    assert "net.layers.0" not in replaced and "net.layers.1" not in replaced
    assert torch.equal(layers[0].weight, before[0]) and torch.equal(layers[1].weight, before[1])
    assert not torch.equal(layers[2].weight, before[2])
