"""Per-token and per-sequence log-probs from vocab-parallel logits.

The logits of a tensor-parallel output layer are split over the vocabulary: each rank holds
``[s, b, V/tp]``. The log-prob of a label is ``logit[label] - logsumexp(logits)``, where the
max, the label's logit and the sum of exponentials are each reduced over the tensor-parallel
group, which is exactly what megatron-core's ``vocab_parallel_cross_entropy`` does (with the
matching backward). The vocabulary is never gathered.

With context parallelism a rank holds a part of every sequence's tokens; ``sequence_logps``
(and ``segment_logps`` for packed rows) with ``group`` (the CP group) reduces the sums and the
response-token counts over it before the average, so the length-normalised log-prob is that of
the whole sequence (never a mean of per-rank means).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def vocab_parallel_token_logps(
    vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Log-prob of each label under the full-vocabulary softmax, in fp32.

    Args:
        vocab_parallel_logits: ``[s, b, V/tp]`` logits of this tensor-parallel rank, any float
            dtype. fp32 logits are overwritten in place (as in Megatron's own loss), so pass a
            clone if you need them afterwards.
        labels: ``[s, b]`` token ids; every id must be a valid vocabulary id (mask padding
            with the loss mask afterwards: -100 is not understood here).
        vocab_size: the true vocabulary size. The entries that pad the vocabulary to a
            multiple of the TP size are left out of the softmax, so log-probs do not depend
            on the padding (and match an unpadded Hugging Face model).

    Returns:
        ``[s, b]`` fp32 log-probs. Differentiable with respect to the logits; collective over
        the tensor-parallel group.
    """
    if vocab_parallel_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(vocab_parallel_logits.shape)} and labels {tuple(labels.shape)} "
            "must agree on every dimension but the last"
        )
    if (labels < 0).any():
        raise ValueError("labels must be valid token ids (>= 0); mask ignored positions instead")
    logits = vocab_parallel_logits.float()
    partition = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * partition
    if vocab_size is not None and start + partition > vocab_size:
        padding = torch.arange(start, start + partition, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def sum_over_group(values: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``values`` over ``group``: forward all-reduce, backward identity; collective.

    For a value that every rank of the group then holds (and uses in the same replicated
    loss), each rank back-propagates through its own part only, so the gradients summed over
    the group (as data-parallel x context-parallel reduction does) are the gradient of one
    loss. Without a group, or a group of one, ``values`` is returned unchanged.
    """
    if group is None or torch.distributed.get_world_size(group) == 1:
        return values
    return reduce_from_tensor_model_parallel_region(values.clone(), group=group)


def sequence_sums(
    per_token_logps: torch.Tensor, loss_mask: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sum of the masked token log-probs, number of masked tokens)`` of ``[b, s]`` rows.

    A sequence with no response token raises ValueError (its average would be NaN, its sum a
    silent zero). ``group`` (the context-parallel group, where each rank holds part of every
    sequence's tokens): the sums and counts are all-reduced over it, which makes the call
    collective; the result is the whole sequences' on every rank (see ``sum_over_group``).
    """
    if per_token_logps.shape != loss_mask.shape:
        raise ValueError(
            f"per_token_logps {tuple(per_token_logps.shape)} and loss_mask "
            f"{tuple(loss_mask.shape)} must have the same shape"
        )
    mask = loss_mask.to(per_token_logps.dtype)
    count = sum_over_group(mask.sum(-1), group).detach()
    total = sum_over_group((per_token_logps * mask).sum(-1), group)
    _check_nonempty(count)
    return total, count


def sequence_logps(
    per_token_logps: torch.Tensor, loss_mask: torch.Tensor, average: bool = True, group=None
) -> torch.Tensor:
    """One value per sequence over the masked tokens of ``[b, s]`` rows: SimPO's length-normalized
    log-prob (``average=True``: sum / number of response tokens) or the plain sum (see
    :func:`sequence_sums` for the errors and ``group``)."""
    total, count = sequence_sums(per_token_logps, loss_mask, group)
    return total / count if average else total


def _check_nonempty(count: torch.Tensor) -> None:
    if (count == 0).any():
        empty = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"sequences {empty} have no response token in loss_mask")


class _ChunkedTokenLogps(torch.autograd.Function):
    """Label log-probs of ``hidden @ weight.T`` over the vocab-parallel softmax, chunk by chunk.

    The forward keeps only the per-token log-sum-exp; the backward recomputes each chunk's
    logits, so no more than ``chunk_size x V/tp`` fp32 logits exist at a time. The gradient
    returned for ``hidden`` is this rank's partial sum over its vocabulary slice (the caller
    all-reduces it over TP, as the output layer's input mapping does).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, vocab_start, vocab_size, transform, group):
        n, partition = hidden.shape[0], weight.shape[0]
        pad = None
        if vocab_size is not None and vocab_start + partition > vocab_size:
            pad = torch.arange(vocab_start, vocab_start + partition, device=hidden.device) >= vocab_size
        local = labels - vocab_start
        owned = (local >= 0) & (local < partition)
        local = local.clamp(0, partition - 1)
        tp = group is not None and torch.distributed.get_world_size(group) > 1
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for begin in range(0, n, chunk_size):
            end = min(begin + chunk_size, n)
            logits = _chunk_logits(hidden[begin:end], weight, transform, pad)
            peak = logits.max(-1).values
            if tp:
                torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
            label_logits = logits.gather(-1, local[begin:end, None]).squeeze(-1) * owned[begin:end]
            sums = torch.stack([logits.sub_(peak[:, None]).exp_().sum(-1), label_logits])
            del logits
            if tp:
                torch.distributed.all_reduce(sums, group=group)
            lse[begin:end] = peak + sums[0].log()
            logps[begin:end] = sums[1] - lse[begin:end]
        ctx.save_for_backward(hidden, weight, local, owned, lse)
        ctx.chunk_size, ctx.transform, ctx.pad = chunk_size, transform, pad
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, local, owned, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulated in the weight's dtype over token chunks (as fused linear cross-entropy
        # kernels do): an fp32 accumulator would add the weight's size in fp32 to the peak.
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for begin in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(begin + ctx.chunk_size, hidden.shape[0])
            h = hidden[begin:end]
            with torch.enable_grad():
                raw = (h @ weight.t()).float()
                if ctx.transform is not None:
                    raw.requires_grad_(True)
                    logits = ctx.transform(raw)
                else:
                    logits = raw
                # d logp / d logits = onehot(label) - softmax, scaled by the incoming gradient.
                g = grad_logps[begin:end, None]
                # In place on the logits when autograd does not need them (no transform).
                grad = logits.detach() if ctx.transform is None else logits.detach().clone()
                grad = grad.sub_(lse[begin:end, None]).exp_().mul_(-g)
                if ctx.pad is not None:
                    grad.masked_fill_(ctx.pad, 0.0)
                grad.scatter_add_(-1, local[begin:end, None], g * owned[begin:end, None])
                if ctx.transform is not None:
                    (grad,) = torch.autograd.grad(logits, raw, grad)
            del raw, logits
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                torch.matmul(grad, weight, out=grad_hidden[begin:end])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _chunk_logits(hidden, weight, transform, pad):
    logits = (hidden @ weight.t()).float()
    if transform is not None:
        logits = transform(logits)
    if pad is not None:
        logits = logits.masked_fill(pad, float("-inf"))
    return logits


def chunked_vocab_parallel_token_logps(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    logits_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Label log-probs straight from the last hidden states, never holding all the logits.

    Equal (values and gradients w.r.t. ``hidden`` and ``output_weight``) to the output layer
    followed by :func:`vocab_parallel_token_logps`, but the fp32 logits exist for
    ``chunk_size`` tokens at a time; the backward recomputes them chunk by chunk.

    Args:
        hidden: ``[s, b, h]`` final hidden states (after the final norm) of the last stage;
            with ``sequence_parallel``, this rank's ``[s/tp, b, h]`` slice.
        output_weight: this rank's ``[V/tp, h]`` rows of the (possibly tied) output weight.
        labels: ``[s, b]`` valid token ids.
        vocab_size: the true vocabulary size; padded entries are left out of the softmax.
        chunk_size: tokens per chunk (of the ``s x b`` flattened tokens).
        logits_transform: an elementwise function applied to the fp32 logits before the
            softmax (e.g. Gemma-2's final soft-capping); differentiated with autograd.
        sequence_parallel: gather the hidden states over TP first (as the output layer does).

    Returns:
        ``[s, b]`` fp32 log-probs; collective over the tensor-parallel group.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (labels < 0).any():
        raise ValueError("labels must be valid token ids (>= 0); mask ignored positions instead")
    if sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != output_weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)} and output_weight "
            f"{tuple(output_weight.shape)} do not fit: need [s, b, h], [s, b] and [V/tp, h]"
        )
    group = parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
    start = parallel_state.get_tensor_model_parallel_rank() * output_weight.shape[0]
    logps = _ChunkedTokenLogps.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        output_weight,
        labels.reshape(-1),
        chunk_size,
        start,
        vocab_size,
        logits_transform,
        group,
    )
    return logps.view(labels.shape)


def segment_sums(
    per_token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``(sums, counts)`` of packed rows: :func:`sequence_sums` over segments.

    ``segment_ids`` (same shape as the log-probs) names each token's sequence in
    ``[0, num_segments)``; tokens with ids >= ``num_segments`` (padding) are left out. Raises
    ValueError for a sequence without a response token. ``group``: as in :func:`sequence_sums`.
    """
    if not per_token_logps.shape == loss_mask.shape == segment_ids.shape:
        raise ValueError(
            f"per_token_logps {tuple(per_token_logps.shape)}, loss_mask {tuple(loss_mask.shape)} "
            f"and segment_ids {tuple(segment_ids.shape)} must have the same shape"
        )
    ids = segment_ids.reshape(-1).clamp(max=num_segments)
    mask = loss_mask.reshape(-1).to(per_token_logps.dtype)
    total = per_token_logps.new_zeros(num_segments + 1).index_add(0, ids, per_token_logps.reshape(-1) * mask)
    count = mask.new_zeros(num_segments + 1).index_add(0, ids, mask)
    total = sum_over_group(total[:num_segments], group)
    count = sum_over_group(count[:num_segments], group).detach()
    _check_nonempty(count)
    return total, count


def segment_logps(
    per_token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    average: bool = True,
    group=None,
) -> torch.Tensor:
    """Per-sequence log-probs of packed rows, averaged or summed (see :func:`segment_sums`)."""
    total, count = segment_sums(per_token_logps, loss_mask, segment_ids, num_segments, group)
    return total / count if average else total
