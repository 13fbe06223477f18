"""GradNormMonitor: per-layer norms equal a hand computation, on a model it knows nothing about."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from src.callbacks import GradNormMonitor, GradNormRecorder
from src.callbacks.grad_flow import parameter_layers
from tests.helpers import MemoryLogger, quiet_trainer


class TinyNet(L.LightningModule):
    """Not an MLPClassifier: a Linear, a LayerNorm and a Linear inside a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordGrads(L.Callback):
    """Runs after the monitor in the same hook and keeps the hand-computed layer norms."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers = {f"body.{i}": pl_module.body[i] for i in (0, 1, 3)}
        self.seen[trainer.global_step] = {
            name: torch.cat([p.grad.flatten() for p in m.parameters()]).norm().item() for name, m in layers.items()
        }


def loader(n: int = 16):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def test_parameter_layers_names_are_relative_and_in_order():
    assert list(parameter_layers(TinyNet())) == ["body.0", "body.1", "body.3"]
    wrapped = nn.Module()
    wrapped.net = nn.Module()
    wrapped.net.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 1)])
    assert list(parameter_layers(wrapped)) == ["layers.0", "layers.1"]


def test_logged_norms_equal_hand_computation():
    logger, recorder = MemoryLogger(), RecordGrads()
    trainer = quiet_trainer(max_steps=4, logger=logger, callbacks=[GradNormMonitor(log_every_n_steps=2), recorder])
    trainer.fit(TinyNet(), loader())
    assert [step for step, _ in logger.metrics["grad_norm/body.0"]] == [0, 2]
    for step, _ in logger.metrics["grad_norm/body.0"]:
        hand = recorder.seen[step]
        logged = {name: dict(logger.metrics[f"grad_norm/{name}"])[step] for name in hand}
        assert logged == pytest.approx(hand, rel=1e-5)
        log10 = {name: dict(logger.metrics[f"grad_norm_log10/{name}"])[step] for name in hand}
        assert log10 == pytest.approx({name: math.log10(value) for name, value in hand.items()}, abs=1e-5)
        total = math.sqrt(sum(v**2 for v in hand.values()))
        assert dict(logger.metrics["grad_norm/total"])[step] == pytest.approx(total, rel=1e-5)
        # LayerNorm has no weight matrix: the flow ratio is Linear 0 over Linear 3
        assert dict(logger.metrics["grad_norm/first_to_last"])[step] == pytest.approx(
            hand["body.0"] / hand["body.3"], rel=1e-5
        )


def test_a_zero_gradient_reads_the_log10_floor_and_log10_can_be_off():
    class Frozen(TinyNet):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 0.0  # every gradient is exactly zero

    logger = MemoryLogger()
    quiet_trainer(max_steps=1, logger=logger, callbacks=[GradNormMonitor(log_every_n_steps=1)]).fit(Frozen(), loader())
    assert dict(logger.metrics["grad_norm_log10/body.0"]) == {0: -30.0}
    logger = MemoryLogger()
    monitor = GradNormMonitor(log_every_n_steps=1, log10=False)
    quiet_trainer(max_steps=1, logger=logger, callbacks=[monitor]).fit(TinyNet(), loader())
    assert "grad_norm/body.0" in logger.metrics and not any(k.startswith("grad_norm_log10/") for k in logger.metrics)


def test_inf_norm_and_per_parameter_norms():
    model = TinyNet()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    layers = parameter_layers(model)
    recorder = GradNormRecorder(norm_type=math.inf).bind(model)
    profile = recorder.record(step=0)
    expected = [max(p.grad.abs().max().item() for p in ps) for ps in layers.values()]
    assert list(profile.norms) == pytest.approx(expected)
    assert list(recorder.param_norms.values()) == pytest.approx([p.grad.abs().max().item() for p in model.parameters()])


@pytest.mark.parametrize("norm_type", [2.0, 3.0, 1.0])
def test_layer_and_total_norms_equal_torchs_norm_of_the_gradients_together(norm_type):
    model = TinyNet()
    for p in model.parameters():
        p.grad = torch.randn_like(p, dtype=torch.float64).float()
    recorder = GradNormRecorder(norm_type=norm_type).bind(model)
    profile = recorder.record(step=0)
    layers = [model.body[i] for i in (0, 1, 3)]
    expected = [
        torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m.parameters()]), norm_type) for m in layers
    ]
    everything = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert profile.norms == pytest.approx([e.item() for e in expected], rel=1e-5)
    assert profile.total == pytest.approx(torch.linalg.vector_norm(everything, norm_type).item(), rel=1e-5)


def test_per_parameter_keys_are_logged():
    logger = MemoryLogger()
    trainer = quiet_trainer(max_steps=1, logger=logger, callbacks=[GradNormMonitor(per_parameter=True)])
    trainer.fit(TinyNet(), loader())
    assert {"grad_norm/body.0.weight", "grad_norm/body.0.bias", "grad_norm/body.3.weight"} <= set(logger.metrics)


class NaNGrads(L.Callback):
    """Overflows step 1's gradients, then zeroes them after the monitor, as a skipped AMP step would."""

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == 1:
            next(pl_module.parameters()).grad.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for p in pl_module.parameters():
            torch.nan_to_num_(p.grad, nan=0.0)


def test_non_finite_steps_are_skipped_with_one_warning():
    logger = MemoryLogger()
    monitor = GradNormMonitor(log_every_n_steps=1)
    trainer = quiet_trainer(max_steps=3, logger=logger, callbacks=[monitor, NaNGrads()])
    with pytest.warns(UserWarning, match="not finite"):
        trainer.fit(TinyNet(), loader())
    assert [step for step, _ in logger.metrics["grad_norm/total"]] == [0, 2]
    assert [p.step for p in monitor.history] == [0, 2]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="norm_type"):
        GradNormMonitor(norm_type=0)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GradNormMonitor(log_every_n_steps=0)


class TwoOptimizers(L.LightningModule):
    """A GAN's shape: manual optimization, a generator and a discriminator, each with its own SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Linear(3, 3)
        self.discriminator = nn.Linear(3, 1)
        self.seen: list[tuple[int, str, float]] = []  # (global step, which, its gradient norm)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        for which, module, opt in (("g", self.generator, opt_g), ("d", self.discriminator, opt_d)):
            opt.zero_grad()
            other = self.discriminator if which == "g" else self.generator
            other.zero_grad()  # the other model's gradients are there too, and must not be counted
            self.manual_backward(self.discriminator(self.generator(x)).pow(2).mean())
            grads = torch.cat([p.grad.flatten() for p in module.parameters()])
            self.seen.append((self.trainer.global_step, which, grads.norm().item()))
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.generator.parameters(), lr=0.01), torch.optim.SGD(self.discriminator.parameters())


def test_two_optimizers_log_each_ones_own_norms_every_n_of_its_own_steps():
    logger, model = MemoryLogger(), TwoOptimizers()
    quiet_trainer(max_steps=12, logger=logger, callbacks=[GradNormMonitor(log_every_n_steps=2)]).fit(model, loader())
    # 6 batches, 12 optimizer steps alternating g, d; every 2nd step of each optimizer: steps 0, 4, 8 and 1, 5, 9
    assert [step for step, _ in logger.metrics["grad_norm/generator"]] == [0, 4, 8]
    assert [step for step, _ in logger.metrics["grad_norm/discriminator"]] == [1, 5, 9]
    hand = {(step, which): norm for step, which, norm in model.seen}
    for step, value in logger.metrics["grad_norm/generator"]:
        assert value == pytest.approx(hand[step, "g"], rel=1e-5)
        assert dict(logger.metrics["grad_norm/total/optimizer_0"])[step] == pytest.approx(hand[step, "g"], rel=1e-5)
    for step, value in logger.metrics["grad_norm/discriminator"]:
        assert value == pytest.approx(hand[step, "d"], rel=1e-5)
    assert "grad_norm/total" not in logger.metrics


class TwoOptimizersStalled(TwoOptimizers):
    """The same, with a loss that never improves: a stall for the detector to diagnose."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.log("loss", 1.0)


def test_the_detectors_diagnosis_reads_each_layer_at_its_own_optimizers_step():
    from src.callbacks import PlateauDetector

    model = TwoOptimizersStalled()
    detector = PlateauDetector(monitor="loss", patience=2, norms_every_n_steps=1)
    quiet_trainer(max_epochs=3, callbacks=[detector]).fit(model, loader())  # 4 batches: 8 steps an epoch
    (event,) = detector.events
    assert event.kind == "stall" and event.epoch == 2
    # the last step of each model before the check: its gradient, not the one the other model's
    # backward left in it (the discriminator's loss also reaches the generator)
    last = {which: norm for _, which, norm in model.seen}
    assert list(event.grad_norms) == ["generator", "discriminator"]
    assert event.grad_norms["generator"] == pytest.approx(last["g"], rel=1e-5)
    assert event.grad_norms["discriminator"] == pytest.approx(last["d"], rel=1e-5)


@pytest.mark.slow
def test_the_callbacks_folder_works_copied_into_a_project_with_its_own_src(tmp_path):
    """The folder imports only torch, Lightning and itself: copied into another project (whose own
    package is also called ``src``), its three lines of use run a fit that stalls and gets out."""
    import shutil
    import subprocess
    import sys

    from tests.helpers import REPO

    project = tmp_path / "their_project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "__init__.py").write_text("")
    (project / "src" / "net.py").write_text(
        "import lightning as L, torch\n"
        "from torch import nn\n"
        "class Net(L.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        layers = [m for _ in range(6) for m in (nn.Linear(10, 10), nn.Sigmoid())]\n"
        "        self.body = nn.Sequential(nn.Linear(2, 10), nn.Sigmoid(), *layers, nn.Linear(10, 1))\n"
        "    def training_step(self, batch, i):\n"
        "        loss = nn.functional.binary_cross_entropy_with_logits(self.body(batch[0]).squeeze(-1), batch[1])\n"
        "        self.log('loss', loss)\n"
        "        return loss\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.SGD(self.parameters(), lr=0.0)  # a scripted stall: the loss never moves\n"
    )
    shutil.copytree(REPO / "src" / "callbacks", project / "src" / "stall", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "train.py").write_text(
        "import lightning as L, torch\n"
        "from src.net import Net\n"
        "from src.stall import GradNormMonitor, PlateauDetector, PlateauEscape\n"
        "L.seed_everything(0)\n"
        "x = torch.cat([torch.randn(10, 2) + torch.tensor([0.0, 8.0]),\n"
        "               torch.randn(10, 2) + torch.tensor([8.0, 0.0])])\n"
        "y = torch.cat([torch.ones(10), torch.zeros(10)])\n"
        "data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)\n"
        "detector = PlateauDetector(monitor='loss', patience=5, warmup=0)\n"
        "callbacks = [GradNormMonitor(), detector, PlateauEscape()]\n"
        "trainer = L.Trainer(max_epochs=11, callbacks=callbacks, logger=False, enable_checkpointing=False,\n"
        "                    enable_progress_bar=False)\n"
        "trainer.fit(Net(), data)\n"
        "import src.stall, src.net\n"
        "print('from', src.stall.__file__, src.net.__file__)\n"
        "events = [(e.kind.value, e.diagnosis, [a.action for a in e.actions]) for e in detector.events]\n"
        "print('events', events[:1])\n"  # the first stall's action has the 5 epochs it takes to judge it
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: this repository is not on the path
    result = subprocess.run(
        [sys.executable, "train.py"], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from {project / 'src' / 'stall' / '__init__.py'} {project / 'src' / 'net.py'}" in result.stdout
    assert "events [('stall', 'vanishing', ['momentum 0.9, layer-wise steps of 0.001 x |W|'])]" in result.stdout


def test_a_layer_unfrozen_during_training_is_logged_from_then_on():
    class Unfreeze(L.Callback):  # what BaseFinetuning does: requires_grad back on at an epoch start
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                pl_module.body[0].requires_grad_(True)

    model = TinyNet()
    model.body[0].requires_grad_(False)
    logger = MemoryLogger()
    monitor = GradNormMonitor(log_every_n_steps=1)
    quiet_trainer(max_epochs=4, logger=logger, callbacks=[monitor, Unfreeze()]).fit(model, loader(n=4))
    assert [step for step, _ in logger.metrics["grad_norm/body.3"]] == [0, 1, 2, 3]
    assert [step for step, _ in logger.metrics["grad_norm/body.0"]] == [2, 3]  # the monitor comes first: no matter


def test_a_layer_added_to_the_optimizer_by_basefinetuning_is_logged_from_then_on():
    from lightning.pytorch.callbacks import BaseFinetuning

    class Grow(L.LightningModule):  # a head trained first; a new layer joins the optimizer at epoch 2
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = self.extra(x) if hasattr(self, "extra") else x
            return nn.functional.cross_entropy(self.head(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    class AddLayer(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            pass

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 2:
                pl_module.extra = nn.Linear(3, 3)
                self.unfreeze_and_add_param_group(pl_module.extra, optimizer)

    logger = MemoryLogger()
    monitor = GradNormMonitor(log_every_n_steps=1)
    quiet_trainer(max_epochs=4, logger=logger, callbacks=[monitor, AddLayer()]).fit(Grow(), loader(n=4))
    assert [step for step, _ in logger.metrics["grad_norm/head"]] == [0, 1, 2, 3]
    assert [step for step, _ in logger.metrics["grad_norm/extra"]] == [2, 3]


def test_two_monitors_in_one_trainer_log_on_their_own_schedules_and_keep_apart_in_a_checkpoint(tmp_path):
    logger = MemoryLogger()
    every, rarely = GradNormMonitor(log_every_n_steps=1), GradNormMonitor(log_every_n_steps=3, per_parameter=False)
    assert every.state_key != rarely.state_key
    trainer = quiet_trainer(max_steps=6, logger=logger, callbacks=[every, rarely], default_root_dir=tmp_path)
    trainer.fit(TinyNet(), loader(n=24))
    steps = [step for step, _ in logger.metrics["grad_norm/body.0"]]
    assert sorted(set(steps)) == [0, 1, 2, 3, 4, 5] and steps.count(0) == 2 and steps.count(3) == 2
    assert len(every.history) == 6 and len(rarely.history) == 2


class Tied(L.LightningModule):
    """An autoencoder whose decoder reuses the encoder's weight (transposed): one parameter, two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 2)
        self.decoder_bias = nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        code = torch.tanh(self.encoder(x))
        return (nn.functional.linear(code, self.encoder.weight.t(), self.decoder_bias) - x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BuiltInConfigureModel(TinyNet):
    """Layers created in configure_model (as for FSDP), not in __init__."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.body = None

    def configure_model(self):
        if self.body is None:
            self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def test_a_shared_parameter_counts_once_and_layers_made_in_configure_model_are_seen():
    logger = MemoryLogger()
    quiet_trainer(max_steps=2, logger=logger, callbacks=[GradNormMonitor(log_every_n_steps=1)]).fit(Tied(), loader())
    layers = {k.removeprefix("grad_norm/") for k in logger.metrics if k.startswith("grad_norm/")} - {
        "total",
        "first_to_last",
    }
    assert layers == {"encoder", "(root)"}  # the tied weight under the encoder only; the root holds decoder_bias
    tied = Tied()
    tied.training_step(next(iter(loader())), 0).backward()
    hand = torch.cat([tied.encoder.weight.grad.flatten(), tied.encoder.bias.grad.flatten()]).norm().item()
    profile = GradNormRecorder().bind(tied).record(0)
    assert dict(zip(profile.names, profile.norms, strict=True))["encoder"] == pytest.approx(hand, rel=1e-5)

    class LastLayerGrad(L.Callback):
        seen: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.flatten() for p in pl_module.body[2].parameters()]
            self.seen[trainer.global_step] = torch.cat(grads).norm().item()

    logger, hand = MemoryLogger(), LastLayerGrad()
    trainer = quiet_trainer(max_steps=2, logger=logger, callbacks=[GradNormMonitor(log_every_n_steps=1), hand])
    trainer.fit(BuiltInConfigureModel(), loader())
    assert [step for step, _ in logger.metrics["grad_norm/body.0"]] == [0, 1]
    assert dict(logger.metrics["grad_norm/body.2"]) == pytest.approx(hand.seen, rel=1e-5)
