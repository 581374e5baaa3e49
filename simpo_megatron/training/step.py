"""``forward_step`` and its loss function for megatron-core's pipeline schedules.

A micro-batch holds ``micro_batch_size`` pairs as ``2 * micro_batch_size`` sequences, all
chosen first, then all rejected in the same order, so the last pipeline stage sees both
members of every pair. The loss function returns megatron-core's 3-tuple
``(sum of pair losses, number of pairs, metrics)``; with ``calculate_per_token_loss=True``
megatron-core divides the summed gradients by the global number of pairs, so the optimized
loss is the exact mean over the pairs of the global batch. The token-level SFT term enters
each micro-batch's sum scaled by global pairs / global chosen tokens (``sft_token_scale``,
which the trainer computes per step and binds into ``forward_step``), which makes it the
exact mean over the global batch's chosen tokens.

With context parallelism (``--context-parallel-size N``) ``forward_step`` gives the model this
CP rank's two chunks of every sequence (tokens, labels, loss mask and positions alike; for a
packed micro-batch, of every padded sequence of the row, with the padded ``cu_seqlens`` in
``PackedSeqParams`` as megatron-core's ``get_thd_batch_on_this_cp_rank`` builds them) and
``loss_func`` reduces per-sequence sums and counts over the CP group before the average: every
CP rank then holds the same pair losses and metrics. Gradients flow back through each rank's
own tokens, and megatron-core sums them over data-parallel x CP ranks and divides by the pair
count all-reduced over the same ranks, so only CP rank 0 reports the pairs: each counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model, unwrap_model

from simpo_megatron.config import LossConfig
from simpo_megatron.data.batch import MicroBatch, ReferenceScores
from simpo_megatron.logprobs import (
    chunked_vocab_parallel_token_logps,
    segment_sums,
    sequence_sums,
    sum_over_group,
    vocab_parallel_token_logps,
)
from simpo_megatron.losses import KNOBS, PairScores, get_loss, sft_token_nll_sum
from simpo_megatron.model.context_parallel import split_for_context_parallel, split_packed_for_context_parallel
from simpo_megatron.model.moe import MicroBatchBalance

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
SFT_KEY = "sft_loss"  # the SFT term (without its weight), reported when --sft-weight > 0
AUX_KEY = "load_balancing_loss"  # the router load-balancing loss (without its weight), with --moe-aux-loss-coeff
# Every metric a step reports, in the order the console prints them (the one list of them).
METRIC_NAMES = METRIC_SUMS[:4] + ("rewards/margins",) + METRIC_SUMS[4:] + (SFT_KEY, AUX_KEY)


def chosen_response_mask(
    loss_mask: torch.Tensor,
    num_pairs: int,
    segment_ids: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``loss_mask`` kept on the chosen responses only: rows ``[0, m)``, or packed segments
    ``[0, m)``; padding pairs (``pair_weights`` 0) left out."""
    if segment_ids is not None:
        return loss_mask * (segment_ids < num_pairs).to(loss_mask.dtype)
    keep = torch.zeros(loss_mask.shape[0], dtype=loss_mask.dtype, device=loss_mask.device)
    keep[:num_pairs] = 1.0 if pair_weights is None else pair_weights.to(keep)
    return loss_mask * keep[:, None]


def sequence_label_mask(loss_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """1 at every label of a sequence, prompt and response: each row (or packed segment) up to
    its last response label. ``loss_mask`` is 1 on the response labels only; a sequence without
    one (padding) gets none. Whole, unsplit sequences only (before any context-parallel split)."""
    index = torch.arange(loss_mask.shape[-1], device=loss_mask.device).expand_as(loss_mask)
    last = torch.where(loss_mask > 0, index, -1)
    if segment_ids is None:
        return (index <= last.amax(-1, keepdim=True)).to(loss_mask.dtype)
    segments = segment_ids.long()
    per_segment = torch.full((int(segments.max()) + 1,), -1, dtype=last.dtype, device=last.device)
    per_segment = per_segment.scatter_reduce(0, segments.flatten(), last.flatten(), "amax")
    return (index <= per_segment[segments]).to(loss_mask.dtype)


def sft_token_mask(batch: MicroBatch, on_prompt: bool) -> torch.Tensor:
    """The labels the token-level SFT term may cover: the responses' (``loss_mask``), or with
    ``on_prompt`` the prompts' too, as TRL's ORPOTrainer takes its NLL over prompt + chosen."""
    if not on_prompt:
        return batch.loss_mask
    return sequence_label_mask(batch.loss_mask, None if batch.packed is None else batch.packed.segment_ids)


def chosen_token_count(batch: MicroBatch, on_prompt: bool = False) -> torch.Tensor:
    """Tokens of a micro-batch's chosen sequences the SFT term covers (the responses', or with
    ``on_prompt`` the prompts' too), padding pairs left out."""
    mask = sft_token_mask(batch, on_prompt)
    if batch.packed is not None:
        return chosen_response_mask(mask, batch.num_pairs, segment_ids=batch.packed.segment_ids).sum()
    return chosen_response_mask(mask, batch.rows // 2, pair_weights=batch.pair_weights).sum()


def loss_func(
    settings: LossConfig,
    vocab_size: int,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    pair_weights: torch.Tensor | None = None,
    sft_token_scale: float | None = None,
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    segments: tuple[torch.Tensor, int] | None = None,
    reference: ReferenceScores | None = None,
    sft_mask: torch.Tensor | None = None,
    balance: MicroBatchBalance | None = None,
):
    """The preference loss of one micro-batch from the last stage's vocab-parallel logits ``[2m, s, V/tp]``.

    Returns ``(loss_sum, num_pairs, metrics)``: ``metrics["simpo"]`` holds the summed
    statistics of ``METRIC_SUMS`` followed by the number of pairs; ``metrics["sft_loss"]``
    the SFT term's sum when ``--sft-weight > 0``, and any other key a loss's own per-pair
    metric summed (ORPO's log-odds). ``pair_weights`` (``[m]``, 1 or 0) leaves padding pairs
    out of every sum and count. ``sft_token_scale`` is global pairs / global chosen-response
    tokens (the token-level SFT form); without it this micro-batch's own ratio is used, which
    is exact for a global batch of one micro-batch. ``head(output_tensor, labels)`` returns the
    token log-probs when the last stage returns something else than the logits (the hidden
    states of the chunked head). ``segments = (segment_ids, m)`` for a packed micro-batch of
    ``m`` pairs: each token's sequence, ``k`` for pair k's chosen response, ``m + k`` for its
    rejected one, ``2m`` for padding. ``reference``: the reference model's scores of the pairs,
    for a reference-based ``--loss-type``. ``sft_mask``: the labels the token-level SFT term
    covers (``--sft-on-prompt``: see ``sft_token_mask``); default ``loss_mask``. ``balance``:
    the micro-batch's router load-balancing loss, whose value is added here once per real pair
    (x ``--moe-aux-loss-coeff``) and reported as ``metrics["load_balancing_loss"]``; its
    gradient reaches the routers from the layers themselves (see ``model/moe.py``).
    """
    cp_group = _context_parallel_group()
    token_logps, policy = policy_scores(vocab_size, labels, loss_mask, output_tensor, head, segments, cp_group)
    num_pairs = policy.chosen_logps.shape[0]
    device = policy.chosen_logps.device
    weights = torch.ones(num_pairs, device=device) if pair_weights is None else pair_weights.to(device, torch.float32)
    real = weights > 0

    def pair_sum(values: torch.Tensor) -> torch.Tensor:
        # where(), not a product: a padding pair's value may be anything, NaN included.
        return torch.where(real, values.float() * weights, 0.0).sum()

    loss = get_loss(settings.loss_type)
    knobs = {k: getattr(settings, k) for k in KNOBS} | {
        "sft_weight": 0.0 if settings.token_sft else settings.sft_weight
    }
    out = loss.compute(
        policy, reference_pair_scores(reference, policy.chosen_logps) if loss.needs_reference else None, **knobs
    )
    chosen, rejected = loss.logged(policy, settings.average_log_prob)
    # An empty (packed) micro-batch still needs a loss connected to the graph for backward.
    loss_sum = pair_sum(out.losses) if num_pairs else 0.0 * token_logps.sum()
    metrics = {}
    if settings.token_sft:
        chosen_mask = chosen_response_mask(
            loss_mask if sft_mask is None else sft_mask,
            num_pairs,
            segment_ids=None if segments is None else segments[0],
            pair_weights=weights,
        )
        if sft_token_scale is None:
            chosen_tokens = sum_over_group(chosen_mask.sum(), cp_group).item()
            sft_token_scale = weights.sum().item() / max(chosen_tokens, 1.0)
        sft_sum = sum_over_group(sft_token_nll_sum(token_logps, chosen_mask, sft_token_scale), cp_group)
        loss_sum = loss_sum + settings.sft_weight * sft_sum
        metrics[SFT_KEY] = sft_sum.detach()
    elif settings.sft_weight > 0:
        # The per-pair form: SimPO's on its own log-prob form, the other losses' on the averaged one.
        sft_chosen = chosen if loss.logged_logps == "flag" else policy.chosen_mean_logps
        metrics[SFT_KEY] = pair_sum(-sft_chosen.detach())
    for name, values in out.metrics.items():
        metrics[name] = pair_sum(values)
    count = weights.sum()
    if balance is not None:
        value = balance.value(device)
        loss_sum = loss_sum + balance.weight * value
        metrics[AUX_KEY] = value * count
    metrics[METRICS_KEY] = torch.stack(
        [
            loss_sum.detach(),
            pair_sum(out.chosen_rewards),
            pair_sum(out.rejected_rewards),
            pair_sum((out.chosen_rewards > out.rejected_rewards).float()),
            pair_sum(chosen.detach()),
            pair_sum(rejected.detach()),
            count,
        ]
    )
    reported = count if cp_group is None or cp_group.rank() == 0 else torch.zeros_like(count)
    return loss_sum, reported.round().to(torch.int), metrics


def policy_scores(vocab_size, labels, loss_mask, output_tensor, head=None, segments=None, cp_group=None):
    """``(token log-probs, PairScores)`` of one micro-batch's sequences on the last stage:
    summed response log-probs and token counts, whole sequences' under context parallelism."""
    if head is None:
        token_logps = vocab_parallel_token_logps(output_tensor, labels, vocab_size)
    else:
        token_logps = head(output_tensor, labels)
    if segments is None:
        sums, counts = sequence_sums(token_logps, loss_mask, group=cp_group)
    else:
        segment_ids, packed_pairs = segments
        sums, counts = segment_sums(token_logps, loss_mask, segment_ids, 2 * packed_pairs, group=cp_group)
    m = sums.shape[0] // 2
    return token_logps, PairScores(sums[:m], sums[m:], counts[:m], counts[m:])


def score_func(vocab_size, labels, loss_mask, output_tensor, head=None, segments=None, pair_weights=None):
    """The reference pass's ``loss_func``: no loss, the micro-batch's per-pair scores as
    ``metrics["scores"]`` (``[m, 4]``: chosen and rejected summed log-probs, their token counts)."""
    cp_group = _context_parallel_group()
    token_logps, scores = policy_scores(vocab_size, labels, loss_mask, output_tensor, head, segments, cp_group)
    table = torch.stack([scores.chosen_logps, scores.rejected_logps, scores.chosen_tokens, scores.rejected_tokens], 1)
    count = torch.tensor(table.shape[0], dtype=torch.int, device=table.device)
    return 0.0 * token_logps.sum(), count, {"scores": table.detach().double()}


def reference_pair_scores(reference: ReferenceScores | None, like: torch.Tensor) -> PairScores:
    """The micro-batch's reference scores as constant ``PairScores`` in ``like``'s dtype and device."""
    if reference is None:
        raise ValueError(
            "this --loss-type needs the reference model's scores of every pair, and the micro-batch has none"
        )
    return PairScores(
        *(
            t.to(like.device, like.dtype)
            for t in (
                reference.chosen_logps,
                reference.rejected_logps,
                reference.chosen_tokens,
                reference.rejected_tokens,
            )
        )
    )


def _context_parallel_group():
    """The CP group when sequences are split over more than one rank, else None."""
    group = parallel_state.get_context_parallel_group(check_initialized=False)
    return group if group is not None and group.size() > 1 else None


def forward_step(
    settings: LossConfig,
    vocab_size: int,
    data_iterator: Iterator[MicroBatch],
    model,
    *,
    sft_token_scale: float | None = None,
    scoring: bool = False,
):
    """One micro-batch through this stage's model chunk; megatron-core's ``forward_step_func``.

    Bind the loss settings, the true (unpadded) vocabulary size and the step's SFT token scale
    (see ``loss_func``) first: ``partial(forward_step, settings, vocab_size, sft_token_scale=s)``.
    """
    host = next(data_iterator)
    batch = host.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu", non_blocking=True)
    tokens, position_ids, labels, loss_mask = batch.tokens, batch.position_ids, batch.labels, batch.loss_mask
    packed = batch.packed  # a packed micro-batch: one THD row, attention per sequence
    segment_ids = None if packed is None else packed.segment_ids
    sft_mask = sft_token_mask(batch, on_prompt=True) if settings.token_sft and settings.sft_on_prompt else None
    cp_group = _context_parallel_group()
    if cp_group is not None:
        if packed is None:
            split = partial(split_for_context_parallel, cp_size=cp_group.size(), cp_rank=cp_group.rank())
        elif packed.cu_seqlens_padded is None:
            raise ValueError(
                "a packed micro-batch with context parallelism needs cu_seqlens_padded (see data/packing.py)"
            )
        else:  # each padded sequence cut into 2 x CP chunks (Transformer Engine's THD layout)
            # The host copy of the offsets: the split reads them as Python ints.
            split = partial(
                split_packed_for_context_parallel,
                cu_seqlens_padded=host.packed.cu_seqlens_padded,
                cp_size=cp_group.size(),
                cp_rank=cp_group.rank(),
            )
        tokens, position_ids, labels, loss_mask = (split(t) for t in (tokens, position_ids, labels, loss_mask))
        if segment_ids is not None:
            segment_ids = split(segment_ids)
        if sft_mask is not None:
            sft_mask = split(sft_mask)
    segments = None if segment_ids is None else (segment_ids, batch.num_pairs)
    hooks = getattr(unwrap_model(model), "router_hooks", None)  # MoE models only
    moe = {}
    if hooks is not None:
        token_mask = batch.real_token_mask()
        moe["padding_mask"] = (token_mask if cp_group is None else split(token_mask)) == 0  # to no expert
    run = partial(
        model,
        tokens,
        position_ids,
        attention_mask=None,
        labels=None,
        packed_seq_params=None if packed is None else packed.seq_params(),
        **moe,
    )
    balance = None
    if hooks is None or hooks.balance is None or scoring:
        output = run()
    else:
        with hooks.recording(batch.num_pairs) as balance:
            output = run()
    if scoring:  # the reference pass: per-pair scores, no loss
        return output, partial(
            score_func, vocab_size, labels, loss_mask, head=_chunked_head(model, vocab_size), segments=segments
        )
    return output, partial(
        loss_func,
        settings,
        vocab_size,
        labels,
        loss_mask,
        pair_weights=batch.pair_weights,
        sft_token_scale=sft_token_scale,
        head=_chunked_head(model, vocab_size),
        segments=segments,
        reference=batch.reference,
        sft_mask=sft_mask,
        balance=balance,
    )


def _chunked_head(model, vocab_size: int):
    """The chunked log-prob head of a last stage that returns hidden states; None otherwise."""
    unwrapped = get_attr_wrapped_model(model, "logprob_chunk_size", return_model_obj=True)
    if not (unwrapped.post_process and unwrapped.logprob_chunk_size > 0):
        return None

    def head(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # hidden is [s, b, h]; labels and the result are [b, s].
        return chunked_vocab_parallel_token_logps(
            hidden,
            unwrapped.output_weight(),
            labels.t(),
            vocab_size,
            chunk_size=unwrapped.logprob_chunk_size,
            logits_transform=unwrapped.logits_transform,
            sequence_parallel=unwrapped.config.sequence_parallel,
        ).t()

    return head


def reduce_metrics(step_outputs: list[dict], group=None) -> dict[str, float]:
    """Sum the micro-batch statistics of one step, all-reduce them over ``group`` (the
    data-parallel group), and return the global-batch means, with ``rewards/margins`` (and
    ``sft_loss`` and a loss's own metrics where the micro-batches report them).

    Call on the last pipeline stage only: that is where the schedule returns loss outputs.
    """
    extra = tuple(k for k in step_outputs[0] if k != METRICS_KEY)
    names = METRIC_SUMS + extra

    def vector(out: dict) -> torch.Tensor:
        stats, count = out[METRICS_KEY][:-1], out[METRICS_KEY][-1:]
        return torch.cat([stats, *(out[k].reshape(1).to(stats.dtype) for k in extra), count])

    sums = torch.stack([vector(out) for out in step_outputs]).sum(0)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
    count = sums[-1].item()
    metrics = {name: (sums[i] / count).item() for i, name in enumerate(names)}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["num_pairs"] = int(round(count))
    return metrics
