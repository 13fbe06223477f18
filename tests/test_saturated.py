"""Units of a bounded activation pinned at a bound: found, diagnosed and re-placed (ReDo's rule)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from src.callbacks import PlateauDetector, PlateauEscape
from src.callbacks.saturated import PinnedUnits, bounded_mlp
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import REPO, quiet_trainer, run_cli

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


def test_bounded_mlps_are_found_and_others_are_not():
    assert list(bounded_mlp(MLPClassifier(depth=3, activation="tanh"))[0]) == ["net.layers.0", "net.layers.1"]
    assert bounded_mlp(MLPClassifier(depth=3, activation="relu")) is None
    assert bounded_mlp(MLPClassifier(depth=3, activation="sigmoid", batch_norm=True)) is None
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    assert bounded_mlp(mixed) is None


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


def scripted(model: MLPClassifier, max_epochs: int, root, callbacks=(), ckpt_path=None):
    """Stalls every 3 epochs (no epoch improves the loss by half), each answered by the default policy."""
    detector = PlateauDetector(patience=3, min_delta=0.5)
    trainer = quiet_trainer(
        max_epochs=max_epochs, callbacks=[detector, PlateauEscape(), *callbacks], default_root_dir=root,
        limit_val_batches=0, deterministic=True, enable_checkpointing=bool(callbacks),
    )  # fmt: skip
    trainer.fit(model, datamodule=Toy2DDataModule(variant="xor4"), ckpt_path=ckpt_path)
    return detector


def test_a_pinned_unit_is_diagnosed_and_re_placed_by_the_default_policy(tmp_path):
    detector = scripted(pinned_xor_net(), 4, tmp_path)
    event = detector.events[0]
    assert event.diagnosis == "saturated_units" and event.units == {"net.layers.0": {"saturated": [1]}}
    assert [a.action for a in event.actions] == ["re-place idle units: net.layers.0 [1]"]


def test_resume_after_re_placing_pinned_units_matches_an_uninterrupted_run(tmp_path):
    straight = pinned_xor_net()
    detector = scripted(straight, 8, tmp_path / "a")
    actions = [a.action for e in detector.events for a in e.actions]
    # epoch 2: re-placed; epoch 5 (the checkpoint is between): its probation is judged (no gain, a
    # repeating action's first: kept), and the stall, no longer of pinned units, gets the any list's first
    assert actions == ["re-place idle units: net.layers.0 [1]", "momentum 0.9"], actions
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    scripted(pinned_xor_net(), 5, tmp_path / "b", callbacks=[checkpoint])
    resumed = pinned_xor_net()
    checkpointed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert any((state.get("snapshot") or {}).get("action") == "re-place idle units" for state in checkpointed.values())
    resumed_detector = scripted(resumed, 8, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [a.action for e in resumed_detector.events for a in e.actions] == actions
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_labs_stuck_xor_seed_learns_with_the_default_config(tmp_path):
    """Seed 8 of the lab's XOR (2-2-1 sigmoid, SGD lr 1.0) ends at 0.347 without help (see
    configs/study/xor_seeds.yaml); with the default policy its pinned hidden units are re-placed and
    it learns XOR (seeds 8, 14, 19 do; 5, 9, 37 fall back into the minimum)."""
    result = run_cli(
        "fit", "--config", str(CONFIGS / "xor.yaml"), "--seed_everything", "8",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diagnosis saturated_units" in result.stdout and "re-place idle units: net.layers.0" in result.stdout
    loss = float(result.stdout.split("train loss ")[1].split(",")[0])
    assert loss < 0.05, result.stdout[-2000:]
