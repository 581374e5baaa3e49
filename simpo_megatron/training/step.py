"""``forward_step`` and its loss function for megatron-core's pipeline schedules.

A micro-batch holds ``micro_batch_size`` pairs as ``2 * micro_batch_size`` sequences, all
chosen first, then all rejected in the same order, so the last pipeline stage sees both
members of every pair. The loss function returns megatron-core's 3-tuple
``(sum of pair losses, number of pairs, metrics)``; with ``calculate_per_token_loss=True``
megatron-core divides the summed gradients by the global number of pairs, so the optimized
loss is the exact mean over the pairs of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_attr_wrapped_model

from simpo_megatron.logprobs import (
    chunked_vocab_parallel_token_logps,
    segment_logps,
    sequence_logps,
    vocab_parallel_token_logps,
)
from simpo_megatron.losses import get_loss

# Order of the summed statistics in a metrics vector; the last entry is the pair count.
METRIC_SUMS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
METRICS_KEY = "simpo"


@dataclass(frozen=True)
class LossSettings:
    """The preference-loss knobs ``loss_func`` needs, taken from the run's config."""

    loss: str = "simpo"
    beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    average_log_prob: bool = True

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


def loss_func(
    settings: LossSettings,
    vocab_size: int,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    segments: tuple[torch.Tensor, int] | None = None,
):
    """SimPO loss of one micro-batch from the last stage's vocab-parallel logits ``[2m, s, V/tp]``.

    ``head(output_tensor, labels)`` returns the ``[2m, s]`` token log-probs when the last
    stage returns something else than the logits (the hidden states of the chunked head).
    ``segments = (segment_ids, m)`` for a packed micro-batch of ``m`` pairs: each token's
    sequence, ``k`` for pair k's chosen response, ``m + k`` for its rejected one, ``2m`` for
    padding.
    Returns ``(loss_sum, num_pairs, {"simpo": sums})`` where ``sums`` holds the summed
    statistics of ``METRIC_SUMS`` followed by the number of pairs.
    """
    if head is None:
        token_logps = vocab_parallel_token_logps(output_tensor, labels, vocab_size)
    else:
        token_logps = head(output_tensor, labels)
    if segments is None:
        seq_logps = sequence_logps(token_logps, loss_mask, average=settings.average_log_prob)
    else:
        segment_ids, packed_pairs = segments
        seq_logps = segment_logps(token_logps, loss_mask, segment_ids, 2 * packed_pairs, settings.average_log_prob)
    num_pairs = seq_logps.shape[0] // 2
    chosen, rejected = seq_logps[:num_pairs], seq_logps[num_pairs:]
    losses, chosen_rewards, rejected_rewards = get_loss(settings.loss)(
        chosen,
        rejected,
        beta=settings.beta,
        gamma_beta_ratio=settings.gamma_beta_ratio,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
        sft_weight=settings.sft_weight,
    )
    # An empty (packed) micro-batch still needs a loss connected to the graph for backward.
    loss_sum = losses.sum() if num_pairs else 0.0 * token_logps.sum()
    sums = torch.stack(
        [
            loss_sum.detach(),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).float().sum(),
            chosen.detach().sum(),
            rejected.detach().sum(),
            torch.tensor(float(num_pairs), device=loss_sum.device),
        ]
    )
    return loss_sum, torch.tensor(num_pairs, dtype=torch.int, device=loss_sum.device), {METRICS_KEY: sums}


def forward_step(settings: LossSettings, vocab_size: int, data_iterator: Iterator[dict], model):
    """One micro-batch through this stage's model chunk; megatron-core's ``forward_step_func``.

    Bind the loss settings and the true (unpadded) vocabulary size first:
    ``partial(forward_step, settings, vocab_size)``.
    """
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens = batch["tokens"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    packed, segments = None, None
    if "cu_seqlens" in batch:  # a packed micro-batch: one THD row, attention per sequence
        cu_seqlens = batch["cu_seqlens"].to(device, non_blocking=True)
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"],
        )
        segments = (batch["segment_ids"].to(device, non_blocking=True), batch["num_pairs"])
    output = model(tokens, position_ids, attention_mask=None, labels=None, packed_seq_params=packed)
    return output, partial(
        loss_func, settings, vocab_size, labels, loss_mask, head=_chunked_head(model, vocab_size),
        segments=segments,
    )


def _chunked_head(model, vocab_size: int):
    """The chunked log-prob head of a last stage that returns hidden states; None otherwise."""
    unwrapped = get_attr_wrapped_model(model, "logprob_chunk_size", return_model_obj=True)
    if not (unwrapped.post_process and unwrapped.logprob_chunk_size > 0):
        return None

    def head(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # hidden is [s, b, h]; labels and the result are [b, s].
        return chunked_vocab_parallel_token_logps(
            hidden, unwrapped.output_weight(), labels.t(), vocab_size,
            chunk_size=unwrapped.logprob_chunk_size, logits_transform=unwrapped.logits_transform,
            sequence_parallel=unwrapped.config.sequence_parallel,
        ).t()

    return head


def reduce_metrics(step_outputs: list[dict], group=None) -> dict[str, float]:
    """Sum the micro-batch statistics of one step, all-reduce them over ``group`` (the
    data-parallel group), and return the global-batch means, with ``rewards/margins``.

    Call on the last pipeline stage only: that is where the schedule returns loss outputs.
    """
    sums = torch.stack([out[METRICS_KEY] for out in step_outputs]).sum(0)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
    count = sums[-1].item()
    metrics = {name: (sums[i] / count).item() for i, name in enumerate(METRIC_SUMS)}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["num_pairs"] = int(count)
    return metrics
