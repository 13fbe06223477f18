"""One pass over the gradients per step, whoever reads them: GradNormMonitor, PlateauDetector, two monitors."""

from __future__ import annotations

from src.callbacks import GradNormMonitor
from tests.helpers import MemoryLogger, quiet_trainer
from tests.test_grad_norm import TinyNet, loader


def test_a_monitor_and_a_detector_share_one_pass_over_the_gradients(monkeypatch):
    from src.callbacks import PlateauDetector, grad_flow

    calls = []
    original = grad_flow.param_grad_norms
    monkeypatch.setattr(grad_flow, "param_grad_norms", lambda *a, **k: calls.append(1) or original(*a, **k))
    monitor, detector = GradNormMonitor(log_every_n_steps=2), PlateauDetector(norms_every_n_steps=2)
    trainer = quiet_trainer(max_steps=6, logger=MemoryLogger(), callbacks=[monitor, detector])
    trainer.fit(TinyNet(), loader(n=24))
    assert len(calls) == 3 and [p.step for p in monitor.history] == [0, 2, 4]
    assert detector.gradients is monitor.gradients and [p.step for p in detector.gradients.since(0)] == [0, 2, 4]
    calls.clear()
    other = GradNormMonitor(log_every_n_steps=3)  # another rate: its own steps, still one pass per step
    trainer = quiet_trainer(max_steps=6, logger=MemoryLogger(), callbacks=[GradNormMonitor(log_every_n_steps=2), other])
    trainer.fit(TinyNet(), loader(n=24))
    assert len(calls) == len({0, 2, 4} | {0, 3}) and [p.step for p in other.history] == [0, 3]


def test_two_monitors_of_different_norm_types_write_apart():
    import math

    logger = MemoryLogger()
    two, inf = GradNormMonitor(log_every_n_steps=1), GradNormMonitor(norm_type=math.inf, log_every_n_steps=1)
    quiet_trainer(max_steps=2, logger=logger, callbacks=[two, inf]).fit(TinyNet(), loader())
    assert [s for s, _ in logger.metrics["grad_norm/body.0"]] == [0, 1]  # once per step: not overwritten
    assert [s for s, _ in logger.metrics["grad_norm_pinf/body.0"]] == [0, 1]
    assert {"grad_norm_pinf_log10/body.0", "grad_norm_pinf/total"} <= set(logger.metrics)
    for (_, l2), (_, linf) in zip(
        logger.metrics["grad_norm/body.0"], logger.metrics["grad_norm_pinf/body.0"], strict=True
    ):
        assert linf < l2  # the largest entry is below the 2-norm of several
