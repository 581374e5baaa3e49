"""The learning-rate schedule equals Hugging Face's step for step (warmup rounded up as HF does).

megatron-core's OptimizerParamScheduler counts in samples (pairs); Hugging Face's LambdaLR
counts optimizer steps. Iteration k of training uses the lr the scheduler holds after k
updates, on both sides.
"""

import math

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from simpo_megatron.config import ConfigError, SimPOConfig
from simpo_megatron.training.trainer import build_scheduler

HF_SCHEDULES = {
    "cosine": get_cosine_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
    "constant": lambda opt, warmup, total: get_constant_schedule_with_warmup(opt, warmup),
}


class _Groups:
    """What the scheduler touches of an optimizer: its param_groups."""

    def __init__(self, lr: float):
        self.param_groups = [{"lr": lr, "weight_decay": 0.0}]


def _megatron_lrs(cfg: SimPOConfig) -> list[float]:
    optimizer = _Groups(cfg.optimizer.lr)
    scheduler = build_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(cfg.optimizer.train_iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=cfg.data.global_batch_size)
    return lrs


def _hf_lrs(style: str, lr: float, warmup_ratio: float, iters: int) -> list[float]:
    # Hugging Face's TrainingArguments.get_warmup_steps: ceil(num_training_steps * warmup_ratio).
    warmup = math.ceil(iters * warmup_ratio)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = HF_SCHEDULES[style](optimizer, warmup, iters)
    lrs = []
    for _ in range(iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(
    "fraction, iters",
    [
        (0.1, 30),  # 0.1 * 30 = 3.0000000000000004: 4 steps on both sides
        (0.1, 25),  # 2.5 rounds up to 3 (int() would give 2)
        (0.05, 7),  # 0.35 rounds up to 1
        (0.0, 12),  # no warmup
        (1.0, 6),  # warmup over the whole run
    ],
)
def test_schedule_matches_hugging_face(style, fraction, iters):
    cfg = SimPOConfig.from_flat(
        mock_data=True,
        lr=3e-4,
        min_lr=0.0,
        lr_decay_style=style,
        lr_warmup_fraction=fraction,
        train_iters=iters,
        global_batch_size=8,
        micro_batch_size=4,
    ).validate(1)
    ours, theirs = _megatron_lrs(cfg), _hf_lrs(style, cfg.optimizer.lr, fraction, iters)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    warmup = math.ceil(iters * fraction)
    if warmup < iters:  # the peak is reached right after the warmup
        assert ours[warmup] == pytest.approx(cfg.optimizer.lr)


def test_warmup_fraction_is_validated():
    with pytest.raises(ConfigError, match="--lr-warmup-fraction"):
        SimPOConfig.from_flat(mock_data=True, lr_warmup_fraction=1.5).validate(1)
