"""PlateauEscape with any optimizer and beside other callbacks: the default policy adapts, a raise keeps its cap."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from src.callbacks import EscapeAction, PlateauDetector, PlateauEscape
from src.callbacks import escape_snapshot as snapshots
from src.callbacks.escape_actions import apply_action
from src.data import Toy2DDataModule
from src.models import MLPClassifier
from tests.helpers import quiet_trainer
from tests.test_escape import sgd


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_the_default_policy_serves_any_standard_optimizer(tmp_path, optimizer):
    class Stalled(MLPClassifier):
        def configure_optimizers(self):
            return getattr(torch.optim, optimizer)(self.parameters(), lr=1e-12)  # no step moves it: stalls

    escape = PlateauEscape()
    detector = PlateauDetector(patience=2)
    trainer = quiet_trainer(max_epochs=12, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(Stalled(depth=3, width=4), datamodule=Toy2DDataModule())
    actions = [a.action for e in detector.events for a in e.actions]
    assert len(actions) >= 3 and not any("needs" in a for a in actions)
    has_momentum = "momentum" in trainer.optimizers[0].param_groups[0]
    assert any(a.startswith("momentum") for a in actions) is has_momentum  # RMSprop has one, Adam not
    assert len(escape._configured["any"]) == 4 and len(escape.actions["any"]) == (4 if has_momentum else 3)


def test_an_lr_raise_never_lowers_an_lr_above_its_cap():
    for lr, expected in ((1.0, 1.0), (0.3, 0.5), (0.05, 0.25)):
        optimizer = sgd(lr=lr)
        settings = apply_action(optimizer, EscapeAction(lr_factor=5, max_lr=0.5))
        assert settings["lr"] == [pytest.approx(expected)]


def test_the_escape_acts_when_a_real_early_stopping_follows_the_detector(tmp_path):
    """The detector moves itself after a real EarlyStopping at setup; the callback after it (here the
    escape) must still be set up: a list changed while Lightning loops over it skipped it."""
    from lightning.pytorch.callbacks import EarlyStopping

    class Frozen(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    detector, escape = PlateauDetector(patience=2), PlateauEscape(actions=[{"lr_factor": 2}])
    stop = EarlyStopping("train/loss", patience=1000)
    trainer = quiet_trainer(max_epochs=6, limit_val_batches=0, callbacks=[detector, escape, stop])
    trainer.fit(Frozen(depth=2, width=4), datamodule=Toy2DDataModule())
    assert trainer.early_stopping_callback is stop
    assert detector.events and detector.events[0].actions[0].action == "lr x2"


def test_an_action_records_the_lr_the_next_step_uses_after_a_scheduler_and_every_group(tmp_path):
    """ReduceLROnPlateau steps at the epoch's end after the detector's check (Lightning updates plateau
    schedulers last): the raise's record says the lr the next optimizer step then uses, cut by the
    scheduler, for each of two param groups (their own lrs kept)."""
    seen = []

    class TwoGroups(MLPClassifier):
        def configure_optimizers(self):
            layers = self.net.layers
            groups = [{"params": layers[0].parameters(), "lr": 1e-9}, {"params": layers[1:].parameters(), "lr": 1e-10}]
            optimizer = torch.optim.SGD(groups)  # lrs so small that the loss never improves: a cut every epoch
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, eps=0.0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "train/loss"}}

        def on_before_optimizer_step(self, optimizer):
            seen.append((self.trainer.global_step, [g["lr"] for g in optimizer.param_groups]))

    detector = PlateauDetector(patience=2, min_delta=0.5)  # a scripted stall every 2 epochs
    escape = PlateauEscape(actions=[{"lr_factor": 5}], probation=None)
    trainer = quiet_trainer(max_epochs=5, limit_val_batches=0, callbacks=[detector, escape], default_root_dir=tmp_path)
    trainer.fit(TwoGroups(depth=2, width=4), datamodule=Toy2DDataModule())  # the raise has its 2 epochs to be judged
    record = detector.events[0].actions[0]
    used = dict(seen)[record.step]  # the first step after the stall
    assert record.lr == pytest.approx(used)  # not the lr just after the raise: the scheduler cut it since
    assert used == pytest.approx([5 * 0.5 * lr for lr in record.lr_from])  # raised x5, then halved
    assert record.lr_from[0] == pytest.approx(10 * record.lr_from[1])  # each group keeps its own lr


@pytest.mark.slow
def test_the_default_config_gets_a_depth_18_sigmoid_net_out_under_adam(tmp_path):
    """Adam's eps (1e-8) is larger than the first layers' gradients (1e-10 and less): its step there is
    grad / eps and they do not move. The default policy's `eps 1e-16` and layer-wise steps get it out."""
    from tests.helpers import REPO, run_cli

    result = run_cli(
        "fit", "--config", str(REPO / "configs" / "default.yaml"), "--model.depth", "18",
        "--optimizer", "torch.optim.Adam", "--optimizer.init_args.lr", "0.001",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diagnosis vanishing" in result.stdout and "action: eps 1e-16" in result.stdout
    assert float(result.stdout.split("train loss ")[1].split(",")[0]) < 0.05, result.stdout[-2000:]


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_the_eps_action_sets_eps_where_there_is_one_and_is_left_out_of_the_default_policy_elsewhere(optimizer):
    from src.callbacks.escape_actions import adapted, check_applicable

    opt = getattr(torch.optim, optimizer)([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    action = EscapeAction(eps=1e-16)
    if optimizer == "SGD":
        assert adapted(action, opt) is None  # the default policy leaves it out
        with pytest.raises(ValueError, match="needs an optimizer with 'eps'"):
            check_applicable(opt, action)  # a user's policy is refused
        return
    assert adapted(action, opt) == action
    apply_action(opt, action)
    assert opt.param_groups[0]["eps"] == 1e-16 and opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("decoupled", [True, False])
def test_a_layer_wise_step_under_adamw_rescales_the_gradients_step_not_its_weight_decay(decoupled):
    """Gradients of 1e-12, far below eps: Adam's step (~grad / eps) is ~1e-5 of AdamW's decay. The
    layer-wise step is the step along the gradient, at 0.01 x |W|, with the decay taken as it was."""
    from src.callbacks.escape_actions import starts_of, trust_update_

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    params = list(layer.parameters())
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) * 1e-12 for p in params]
    opt = torch.optim.Adam(params, lr=0.1, weight_decay=0.1, decoupled_weight_decay=decoupled)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    before = starts_of({"layer": params}, opt)
    opt.step()
    trust_update_({"layer": params}, before, 0.01)
    kept = 1 - 0.1 * 0.1 if decoupled else 1.0  # the decay AdamW takes; Adam's L2 decay is in its gradient
    steps = torch.cat([(p.detach() - kept * s).flatten() for p, s in zip(params, start, strict=True)])
    size = torch.cat([kept * s.flatten() for s in start]).norm()
    assert steps.norm() == pytest.approx(0.01 * size.item(), rel=1e-4)
    along = -torch.cat([g.flatten() for g in grads]) * 1e12  # cosine_similarity clamps norms below 1e-8
    cosine = torch.nn.functional.cosine_similarity(steps, along, dim=0)
    assert cosine > 0.99 if decoupled else cosine < 0.5  # coupled L2 decay: the optimizer's own direction


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "RMSprop"])
def test_the_default_policys_layer_wise_steps_are_as_large_as_sgds_under_momentum(optimizer):
    """SGD's layer-wise steps under momentum m add up to 1 / (1 - m) of one; any other optimizer's
    step is set as it is taken (momentum's sum in it, RMSprop's): the same size, momentum kept where
    it has one."""
    from src.callbacks.escape_policy import DEFAULT_ACTIONS, policy_for

    param = [torch.nn.Parameter(torch.zeros(1))]
    on_sgd = policy_for(DEFAULT_ACTIONS, [torch.optim.SGD(param, lr=0.1)], adapt=True)
    other = getattr(torch.optim, optimizer)(param, lr=1e-3)
    on_other = policy_for(DEFAULT_ACTIONS, [other], adapt=True)
    for key in DEFAULT_ACTIONS:
        sgd_steps = [(a.trust_ratio / (1 - (a.momentum or 0.0)), a.momentum) for a in on_sgd[key] if a.trust_ratio]
        steps = [(a.trust_ratio, a.momentum) for a in on_other[key] if a.trust_ratio]
        momenta = [m if "momentum" in other.param_groups[0] else None for _, m in sgd_steps]
        assert [s for s, _ in steps] == pytest.approx([s for s, _ in sgd_steps]) and [m for _, m in steps] == momenta


@pytest.mark.parametrize("restore", ["settings", "weights", "own settings"])
def test_rmsprop_steps_on_once_a_rollback_puts_back_a_momentum_whose_buffers_were_cleared(restore):
    """RMSprop creates its momentum buffer at a param's first step only. An action that sets momentum
    0 clears the buffers; a rollback that puts 0.9 back (an action's settings withdrawn, its weights
    and optimizer state rolled back, or the run's own settings at the safe point) gives them back."""
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.RMSprop(layer.parameters(), lr=1e-3, momentum=0.9)
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    trainer = SimpleNamespace(optimizers=[optimizer], lr_scheduler_configs=[])
    own = snapshots.group_settings(trainer)
    apply_action(optimizer, EscapeAction(momentum=0.0))
    assert not any("momentum_buffer" in optimizer.state[p] for p in layer.parameters())
    cleared = snapshots.take_snapshot(trainer, layer)  # the state without buffers, and momentum 0.9...
    cleared["optimizers"][0]["param_groups"][0]["momentum"] = 0.9  # ...put back by a withdrawal before
    if restore == "own settings":
        snapshots.put_settings(trainer, own)
    else:
        snapshots.restore_snapshot(trainer, layer, cleared, weights=restore == "weights")
    assert optimizer.param_groups[0]["momentum"] == 0.9
    optimizer.step()  # a KeyError ('momentum_buffer') without the buffers given back
    assert all("momentum_buffer" in optimizer.state[p] for p in layer.parameters())


class StepSizes(L.Callback):
    """Each weight layer's first step, as a share of its size before it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = {name: [p.detach().clone() for p in params] for name, params in self.layers.items()}

    def on_train_batch_end(self, trainer, pl_module, *args):
        flat = lambda tensors: torch.cat([t.flatten() for t in tensors])  # noqa: E731
        self.ratios = {
            name: float((flat(params) - flat(self.start[name])).norm() / flat(self.start[name]).norm())
            for name, params in self.layers.items()
        }
        trainer.should_stop = True


@pytest.mark.parametrize("clip", [None, 0.01])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_layer_wise_steps_are_their_size_under_lightnings_gradient_clipping(clip, optimizer):
    """Lightning clips the gradients after ``on_before_optimizer_step``: SGD's gradients scaled there were
    clipped back to the clip's norm (here every layer's step was 0.02% of |W|, not 1%)."""
    from src.callbacks.grad_flow import parameter_layers

    torch.manual_seed(0)
    model = MLPClassifier(depth=8, width=8, activation="sigmoid")
    model.configure_optimizers = lambda: getattr(torch.optim, optimizer)(model.parameters(), lr=0.1)
    escape, sizes = PlateauEscape(), StepSizes()
    escape.trust_ratio = 0.01  # layer-wise steps in force from the first step
    sizes.layers = {name: ps for name, ps in parameter_layers(model).items() if any(p.ndim >= 2 for p in ps)}
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, gradient_clip_val=clip,
                            callbacks=[PlateauDetector(), escape, sizes])  # fmt: skip
    trainer.fit(model, datamodule=Toy2DDataModule())
    assert len(sizes.ratios) == 8 and list(sizes.ratios.values()) == pytest.approx([0.01] * 8, rel=1e-3)
