"""Context parallelism on the local layers: the sequence layout, and attention over it.

megatron-core's layout (``megatron.core.utils.get_batch_on_this_cp_rank``, and the rotary
table's ``get_pos_emb_on_this_cp_rank``): a sequence of length ``s`` is cut into ``2N``
chunks of ``s / 2N`` tokens, and CP rank ``r`` of ``N`` holds chunks ``r`` and ``2N-1-r``, in
that order. With causal attention the early chunks are cheap and the late ones expensive;
pairing chunk ``r`` with its mirror gives every rank the same work. ``local_positions`` is the
one definition of that layout here: the batch split and the attention mask both use it, and a
test checks it against megatron-core's own functions (which place RoPE).

Packed micro-batches (THD, ``--packing``) are split the way Transformer Engine's
``thd_get_partitioned_indices`` (used by megatron-core's ``get_thd_batch_on_this_cp_rank``)
splits them: every sequence is padded to a multiple of ``2N`` (``cu_seqlens_padded``) and cut
into ``2N`` chunks of its own, rank ``r`` holding chunks ``r`` and ``2N-1-r`` of each sequence,
sequence after sequence (``thd_partition_indices``). So the local row holds ``1/N`` of every
sequence, and within one sequence the layout is the unpacked one.

``context_parallel_attention`` is the core attention for it on the local layer spec: keys and
values are all-gathered over the CP group (their gradients reduce-scattered back), and each
local query attends to every key at a global position not after its own. Transformer Engine
layers do context parallelism themselves (``--cp-comm-type``) and do not use this module.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel


def check_cp_divisible(seq_length: int, cp_size: int) -> None:
    """A sequence splits into ``2 x cp_size`` equal chunks only if its length is a multiple."""
    if seq_length % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x context-parallel size "
            f"({2 * cp_size}): pad it to a multiple"
        )


def local_positions(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions (``[seq_length / cp_size]``) of the tokens that CP rank ``cp_rank`` holds."""
    check_cp_divisible(seq_length, cp_size)
    chunk = seq_length // (2 * cp_size)
    starts = (cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


def thd_partition_indices(cu_seqlens_padded, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Indices (into the packed row) of the tokens CP rank ``cp_rank`` holds, in its local order.

    ``cu_seqlens_padded`` (``[n + 1]`` offsets of ``n`` sequences, each a multiple of
    ``2 x cp_size`` long): the local row is, for each sequence in turn, its chunks ``cp_rank``
    and ``2 x cp_size - 1 - cp_rank`` (Transformer Engine's ``thd_get_partitioned_indices``).
    """
    bounds = [int(c) for c in cu_seqlens_padded]
    parts = [
        start + local_positions(end - start, cp_size, cp_rank, device=device)
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def split_packed_for_context_parallel(
    tensor: torch.Tensor, cu_seqlens_padded, cp_size: int, cp_rank: int, dim: int = 1
) -> torch.Tensor:
    """This CP rank's part of a packed (THD) ``tensor`` along ``dim``: ``thd_partition_indices``."""
    if cp_size == 1:
        return tensor
    if int(cu_seqlens_padded[-1]) != tensor.shape[dim]:
        raise ValueError(
            f"cu_seqlens_padded ends at {int(cu_seqlens_padded[-1])}, the packed row has {tensor.shape[dim]} tokens"
        )
    return tensor.index_select(dim, thd_partition_indices(cu_seqlens_padded, cp_size, cp_rank, device=tensor.device))


def split_for_context_parallel(tensor: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of ``tensor`` along its sequence dimension ``dim`` (megatron's layout)."""
    if cp_size == 1:
        return tensor
    index = local_positions(tensor.shape[dim], cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(dim, index)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward: reduce-scatter of the gradient.

    megatron-core's ``gather_from_sequence_parallel_region`` does the same, but allocates its
    backward buffer on ``torch.cuda.current_device()``, which the CPU (gloo) runs cannot meet
    inside the autograd engine; this one allocates where the tensor lives.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = local.new_empty((local.shape[0] * group.size(), *local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        out = grad.new_empty((grad.shape[0] // group.size(), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
        return out, None


def gather_sequence(local: torch.Tensor, group) -> torch.Tensor:
    """``[s/N, ...]`` of each rank of ``group`` -> ``[s, ...]`` in rank order (differentiable)."""
    return _GatherSequence.apply(local, group)


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cp_group,
    softmax_scale: float,
    dropout_p: float = 0.0,
    cu_seqlens_padded: list[int] | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's queries over the keys and values of the whole sequence.

    ``query`` ``[s/N, b, np, hn]`` and ``key``/``value`` ``[s/N, b, ng, hn]`` hold this rank's
    two chunks (see the module docstring); returns the context ``[s/N, b, np*hn]``. Keys and
    values are gathered over ``cp_group`` in rank order (forward all-gather, backward
    reduce-scatter: ``gather_sequence``), and the mask is built from global positions: key
    position <= query position. The attention itself is recomputed in backward, so a layer
    keeps only its inputs (O(s)) for backward. Collective over ``cp_group``.

    Packed sequences (THD, ``b == 1``): ``cu_seqlens_padded`` are the global offsets of the
    padded sequences (``thd_partition_indices``' layout); each sequence's local queries attend
    to that sequence's gathered keys only, with the same positional mask (same sequence AND
    key position <= query position).
    """
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    local, b, heads, head_dim = query.shape
    key, value = gather_sequence(key, cp_group), gather_sequence(value, cp_group)
    attend = partial(_masked_attention, cp_size=cp_size, cp_rank=cp_rank, scale=softmax_scale, dropout_p=dropout_p)
    # Recomputed in backward (megatron's checkpoint keeps the dropout RNG): SDPA would otherwise
    # keep its [s/N, s] float mask of every layer for backward, memory quadratic in s.
    if cu_seqlens_padded is None:
        context = tensor_parallel.checkpoint(attend, False, query, key, value)
    else:
        if b != 1 or cu_seqlens_padded[-1] != local * cp_size:
            raise ValueError(
                f"packed context-parallel attention needs one row of cu_seqlens_padded[-1] / CP tokens, got "
                f"{local} x {b} tokens for cu_seqlens_padded ending at {cu_seqlens_padded[-1]} (CP={cp_size})"
            )
        # Rank r's block of the gathered row holds sequence i at the local bounds [a, b).
        key, value = (t.view(cp_size, local, *t.shape[1:]) for t in (key, value))
        bounds = [c // cp_size for c in cu_seqlens_padded]
        parts = [
            tensor_parallel.checkpoint(
                attend, False, query[start:end], key[:, start:end].flatten(0, 1), value[:, start:end].flatten(0, 1)
            )
            for start, end in zip(bounds[:-1], bounds[1:])
            if end > start
        ]
        context = torch.cat(parts, dim=2)
    return context.permute(2, 0, 1, 3).reshape(local, b, heads * head_dim)


def _masked_attention(query, key, value, *, cp_size, cp_rank, scale, dropout_p):
    """SDPA of the local queries over the gathered keys, with the chunks' causal mask."""
    seq_length = key.shape[0]
    q_pos = local_positions(seq_length, cp_size, cp_rank, device=query.device)
    k_pos = torch.cat([local_positions(seq_length, cp_size, r, device=query.device) for r in range(cp_size)])
    mask = k_pos[None, :] <= q_pos[:, None]  # [s/N, s]: True where the query may attend
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
    kwargs = dict(attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if dropout_p > 0:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
