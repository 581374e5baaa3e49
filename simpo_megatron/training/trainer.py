"""Model, optimizer and scheduler set-up, and one training / evaluation step.

Everything here is megatron-core's: DistributedDataParallel (with the distributed optimizer
when asked), ``get_megatron_optimizer`` (Adam or SGD, grad clipping, loss scaling),
``OptimizerParamScheduler`` (warmup, then cosine or linear decay) and the pipeline schedules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import TypedDict

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from simpo_megatron.config import SimPOConfig
from simpo_megatron.data.batch import MicroBatch
from simpo_megatron.model import build_model
from simpo_megatron.model.gpt import params_dtype
from simpo_megatron.training.step import chosen_token_count, forward_step, reduce_metrics


@dataclass
class TrainState:
    """What a run holds between steps; what a checkpoint saves."""

    model: list[DistributedDataParallel]
    optimizer: object
    scheduler: OptimizerParamScheduler
    iteration: int = 0
    consumed_samples: int = 0


def setup_model_and_optimizer(cfg: SimPOConfig, padded_vocab_size: int) -> TrainState:
    """Build this rank's model chunks, wrap them in DDP, and create optimizer and scheduler."""
    model_cfg = dataclasses.replace(
        cfg.model, max_position_embeddings=cfg.model.max_position_embeddings or cfg.data.seq_length
    )
    chunks = build_model(model_cfg, cfg.parallel_layout(), padded_vocab_size)
    tf_config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # Gradients are summed over pairs and divided by the global pair count once
        # (calculate_per_token_loss), so the collective must not average as well.
        average_in_collective=False,
    )
    model = [
        DistributedDataParallel(
            config=tf_config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk overlaps its reduce with backward (as Megatron-LM does).
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
    for m in model:
        m.broadcast_params()
    no_sync = [m.no_sync for m in model]
    tf_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.parallel.overlap_grad_reduce:
        grad_sync = [m.start_grad_sync for m in model]
        tf_config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if cfg.parallel.overlap_param_gather:
        param_sync = [m.start_param_sync for m in model]
        tf_config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    tf_config.finalize_model_grads_func = finalize_model_grads

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=cfg.optimizer.optimizer,
            lr=cfg.optimizer.lr,
            min_lr=cfg.optimizer.min_lr,
            weight_decay=cfg.optimizer.weight_decay,
            adam_beta1=cfg.optimizer.adam_beta1,
            adam_beta2=cfg.optimizer.adam_beta2,
            adam_eps=cfg.optimizer.adam_eps,
            sgd_momentum=cfg.optimizer.sgd_momentum,
            clip_grad=cfg.optimizer.clip_grad,
            bf16=cfg.model.bf16,
            fp16=cfg.model.fp16,
            params_dtype=params_dtype(cfg.model),
            initial_loss_scale=cfg.optimizer.initial_loss_scale,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
        ),
        model,
    )
    tf_config.grad_scale_func = optimizer.scale_loss
    return TrainState(model=model, optimizer=optimizer, scheduler=build_scheduler(cfg, optimizer))


def build_scheduler(cfg: SimPOConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup then constant / linear / cosine decay, counted in pairs like Megatron-LM.

    ``--lr-warmup-fraction f`` warms up for ``ceil(f x decay iterations)`` steps, rounded up as
    Hugging Face's ``warmup_ratio`` is, so a recipe's schedule matches the reference step for step.
    """
    decay_iters = cfg.optimizer.lr_decay_iters or cfg.optimizer.train_iters
    warmup_iters = (
        math.ceil(cfg.optimizer.lr_warmup_fraction * decay_iters)
        if cfg.optimizer.lr_warmup_fraction is not None
        else cfg.optimizer.lr_warmup_iters
    )
    gbs = cfg.data.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_iters > 0 else cfg.optimizer.lr,
        max_lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        lr_warmup_steps=warmup_iters * gbs,
        lr_decay_steps=max(decay_iters * gbs, warmup_iters * gbs + 1),
        lr_decay_style=cfg.optimizer.lr_decay_style,
        start_wd=cfg.optimizer.weight_decay,
        end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
    )


def run_schedule(
    cfg: SimPOConfig,
    model,
    batches: list[MicroBatch],
    forward_only: bool,
    sft_token_scale: float | None = None,
    scoring: bool = False,
):
    """Run megatron-core's schedule over one global batch's micro-batches on this rank (with
    ``scoring``, forward-only, the reference pass's per-pair scores instead of the loss)."""
    seq_length = max(b.width for b in batches)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1 and not model[0].config.variable_seq_lengths:
        # Stages that do not exchange shapes (the interleaved schedule on gloo, see
        # model/gpt.py) need every micro-batch of the step in the shape passed below.
        batches = [b.padded_to(seq_length) for b in batches]
    # Every model chunk (virtual stage) walks the same micro-batches with its own iterator.
    iterators = [iter(batches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=partial(
            forward_step, cfg.loss, cfg.model.vocab_size, sft_token_scale=sft_token_scale, scoring=scoring
        ),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        # Rows of the first micro-batch (packed micro-batches are one row); with PP>1 the
        # stages exchange each micro-batch's shape (variable_seq_lengths).
        micro_batch_size=batches[0].rows,
        forward_only=forward_only,
    )


def global_sft_token_scale(cfg: SimPOConfig, batches: list[MicroBatch]) -> float | None:
    """Global pairs / chosen tokens the SFT term covers in the global batch (None without the token-level SFT term).

    The token-level SFT term is a mean over all chosen tokens of the global batch; the count is
    all-reduced over the data-parallel group before the schedule runs (see ``sft_token_nll_sum``).
    """
    if not cfg.loss.token_sft:
        return None
    counts = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        counts[0] += b.num_pairs if b.pair_weights is None else float(b.pair_weights.sum())
        counts[1] += float(chosen_token_count(b, cfg.loss.sft_on_prompt))
    if torch.cuda.is_available():
        counts = counts.cuda()
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    pairs, tokens = counts.tolist()
    return pairs / max(tokens, 1.0)


def _last_stage_metrics(outputs: list[dict]) -> dict[str, float] | None:
    """Global-batch metrics on the last pipeline stage; None elsewhere."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return reduce_metrics(outputs, group=parallel_state.get_data_parallel_group())


def _grads_are_finite(model: list[DistributedDataParallel]) -> bool:
    """Whether every gradient on every rank is finite (one flag all-reduced over the world).

    fp32 and bf16 optimizers have no loss scaler to catch an inf/NaN, so the check runs
    before the optimizer step: a non-finite gradient must skip the update, not apply it.
    """
    bad = torch.zeros((), dtype=torch.float32, device=model[0].buffers[0].grad_data.device)
    for m in model:
        for buffer in m.buffers + m.expert_parallel_buffers:
            bad = torch.maximum(bad, (~torch.isfinite(buffer.grad_data)).any().float())
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0


class StepResult(TypedDict):
    """What ``train_step`` reports: the global-batch metrics (last pipeline stage; None
    elsewhere), the gradient norm (None when the optimizer did not run), the learning rate,
    and whether the update was skipped."""

    metrics: dict[str, float] | None
    grad_norm: float | None
    lr: float
    skipped: bool


def train_step(cfg: SimPOConfig, state: TrainState, batches: list[MicroBatch]) -> StepResult:
    """Forward and backward over one global batch, then one optimizer step.

    As in Megatron-LM, a step is skipped exactly when the optimizer did not update the weights:
    a non-finite gradient (checked here for fp32 and bf16) or an fp16 loss-scale overflow. Only
    an applied update advances the learning-rate schedule. An applied update may still report
    a non-finite gradient norm (the norm overflowed while every gradient was finite).
    """
    for m in state.model:
        m.train()
        m.zero_grad_buffer()
    state.optimizer.zero_grad()
    scale = global_sft_token_scale(cfg, batches)
    outputs = run_schedule(cfg, state.model, batches, forward_only=False, sft_token_scale=scale)
    update_successful, grad_norm = False, None
    # With --fp16 the dynamic loss scaler detects inf/NaN itself, and it must see every
    # overflow to lower the scale; the explicit check is for fp32 and bf16.
    if cfg.model.fp16 or _grads_are_finite(state.model):
        update_successful, grad_norm, _ = state.optimizer.step()
    if update_successful:
        state.scheduler.step(increment=cfg.data.global_batch_size)
    state.iteration += 1
    state.consumed_samples += cfg.data.global_batch_size
    return StepResult(
        metrics=_last_stage_metrics(outputs),
        grad_norm=grad_norm,
        lr=state.optimizer.param_groups[0]["lr"],
        skipped=not update_successful,
    )


@torch.no_grad()
def eval_step(cfg: SimPOConfig, state: TrainState, batches: list[MicroBatch]) -> dict[str, float] | None:
    """The global-batch metrics of ``batches`` without updating anything."""
    for m in state.model:
        m.eval()
    scale = global_sft_token_scale(cfg, batches)
    outputs = run_schedule(cfg, state.model, batches, forward_only=True, sft_token_scale=scale)
    return _last_stage_metrics(outputs)
