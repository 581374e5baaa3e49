"""Per-token and per-sequence log-probs from vocab-parallel logits.

The logits of a tensor-parallel output layer are split over the vocabulary: each rank holds
``[s, b, V/tp]``. The log-prob of a label is ``logit[label] - logsumexp(logits)``, where the
max, the label's logit and the sum of exponentials are each reduced over the tensor-parallel
group, which is exactly what megatron-core's ``vocab_parallel_cross_entropy`` does (with the
matching backward). The vocabulary is never gathered.

With context parallelism a rank holds a part of every sequence's tokens; ``sequence_logps``
with ``group`` (the CP group) reduces the sums and the response-token counts over it before
the average, so the length-normalised log-prob is that of the whole sequence (never a mean of
per-rank means).
"""

from __future__ import annotations

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


def sequence_logps(
    per_token_logps: torch.Tensor, loss_mask: torch.Tensor, average: bool = True, group=None
) -> torch.Tensor:
    """Reduce ``[b, s]`` token log-probs to one value per sequence over the masked tokens.

    ``average=True`` is SimPO's length-normalized reward (sum / number of response tokens);
    ``average=False`` is the plain sum. A sequence with no response token raises ValueError
    in both modes (its average would be NaN, its sum a silent zero).

    ``group`` (the context-parallel group, where each rank holds part of every sequence's
    tokens): the sums and counts are all-reduced over it first, which makes the call
    collective; the result is the whole sequences' value on every rank (see ``sum_over_group``).
    """
    if per_token_logps.shape != loss_mask.shape:
        raise ValueError(
            f"per_token_logps {tuple(per_token_logps.shape)} and loss_mask "
            f"{tuple(loss_mask.shape)} must have the same shape"
        )
    mask = loss_mask.to(per_token_logps.dtype)
    count = sum_over_group(mask.sum(-1), group).detach()
    total = sum_over_group((per_token_logps * mask).sum(-1), group)
    if (count == 0).any():
        empty = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"sequences {empty} have no response token in loss_mask")
    return total / count if average else total
