"""train_step reports what the optimizer did: skipped exactly when no update was applied, and
only an applied update advances the learning-rate schedule (Megatron-LM's rule)."""

import math

import pytest

from simpo_megatron.testing import tiny_config
from simpo_megatron.training import trainer


class _Model:
    def train(self):
        pass

    def zero_grad_buffer(self):
        pass


class _Optimizer:
    def __init__(self, returns):
        self.returns, self.steps = returns, 0
        self.param_groups = [{"lr": 0.5}]

    def zero_grad(self):
        pass

    def step(self):
        self.steps += 1
        return self.returns


class _Scheduler:
    def __init__(self):
        self.increments = []

    def step(self, increment):
        self.increments.append(increment)


@pytest.mark.parametrize(
    "fp16, finite_grads, returns, applied",
    [
        (False, True, (True, 1.5, None), True),
        # Every gradient finite, the norm overflowed: the optimizer still applied the update.
        (False, True, (True, math.inf, None), True),
        (False, False, None, False),  # non-finite gradients: the optimizer does not run
        (True, True, (False, None, None), False),  # fp16: the loss scaler found an overflow
    ],
)
def test_skipped_means_no_update(monkeypatch, fp16, finite_grads, returns, applied):
    cfg = tiny_config(fp16=fp16, global_batch_size=4)
    monkeypatch.setattr(trainer, "run_schedule", lambda *args, **kwargs: [])
    monkeypatch.setattr(trainer, "_last_stage_metrics", lambda outputs: None)
    checked = []
    monkeypatch.setattr(trainer, "_grads_are_finite", lambda model: checked.append(True) or finite_grads)
    state = trainer.TrainState(model=[_Model()], optimizer=_Optimizer(returns), scheduler=_Scheduler())

    result = trainer.train_step(cfg, state, batches=[])

    assert result["skipped"] is (not applied)
    assert state.scheduler.increments == ([4] if applied else [])
    assert state.optimizer.steps == (0 if returns is None else 1)
    assert checked == ([] if fp16 else [True])  # fp16's loss scaler does its own check
    assert result["grad_norm"] == (None if returns is None else returns[1])
    assert (state.iteration, state.consumed_samples) == (1, 4)
