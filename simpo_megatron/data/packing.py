"""Packing the pairs of a global batch into dense micro-batches (``--packing``).

A packed micro-batch is one row of concatenated sequences (megatron-core's THD layout:
``[1, T]`` tokens with ``cu_seqlens``), holding at most ``2 x micro_batch_size x seq_length``
tokens: ``--micro-batch-size`` keeps its meaning as a memory budget. Within a micro-batch the
sequences are ordered as in an unpacked one (all chosen, then all rejected, pair by pair), so
the last stage holds both members of every pair; positions restart at every sequence, and
attention (``cu_seqlens``) never crosses a sequence boundary. The tail padding is a segment
of its own.

With context parallelism (``sequence_multiple_of = 2 x CP``) every sequence is padded at its
end to a multiple of ``2 x CP`` tokens, as megatron-core / Transformer Engine expect for THD
with CP: ``cu_seqlens_padded`` holds the padded sequences' offsets and ``cu_seqlens`` the
cumulative real lengths (TE's convention); the padding tokens continue the sequence's
positions, belong to its segment and are out of the loss mask. The packing plan counts the
padded sizes.

A step is planned from the whole global batch on every rank, so no communication is needed
to agree: the pairs are spread over the data-parallel ranks by token count (largest first, to
the rank with the fewest tokens), each rank's pairs are packed first-fit-decreasing, and every
rank pads its list with empty micro-batches to the largest count (rounded up to a multiple of
the pipeline size for the interleaved schedule). The step's pairs, hence its loss, do not
depend on any of this.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from simpo_megatron.data.pair_dataset import PairSample, sequence_row


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pair_tokens(sample: PairSample, sequence_multiple_of: int = 1) -> int:
    """Tokens a pair takes when packed: prompt + chosen and prompt + rejected, each rounded up
    to ``sequence_multiple_of``."""
    prompt = len(sample["prompt"])
    return sum(_round_up(prompt + len(sample[key]), sequence_multiple_of) for key in ("chosen", "rejected"))


def balance_over_ranks(sizes: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Indices of ``sizes`` split over ``num_ranks`` with balanced sums (largest first, greedy).

    Deterministic; each rank's indices come back in ascending order.
    """
    loads = [0] * num_ranks
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        loads[rank] += sizes[i]
        shares[rank].append(i)
    return [sorted(share) for share in shares]


def pack_first_fit(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``sizes`` in bins of at most ``budget`` (first-fit decreasing), each ascending."""
    too_big = [s for s in sizes if s > budget]
    if too_big:
        raise ValueError(f"a pair of {too_big[0]} tokens exceeds the micro-batch budget of {budget} tokens")
    room: list[int] = []
    bins: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = next((b for b, r in enumerate(room) if r >= sizes[i]), None)
        if target is None:
            room.append(budget)
            bins.append([])
            target = len(bins) - 1
        room[target] -= sizes[i]
        bins[target].append(i)
    return [sorted(b) for b in bins]


def collate_packed(
    samples: Sequence[PairSample],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    sequence_multiple_of: int = 1,
) -> dict[str, torch.Tensor | int]:
    """One packed micro-batch of ``m`` pairs (``m`` may be 0: an empty micro-batch).

    Returns ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` and ``segment_ids`` (the
    sequence of each token: ``k`` for pair k's chosen, ``m + k`` for its rejected, ``2m`` for
    the tail padding), all ``[1, T]``; ``cu_seqlens`` (int32, with the padding segment) and
    ``max_seqlen``; ``num_pairs`` and ``num_tokens`` (real tokens). With
    ``sequence_multiple_of > 1`` (context parallelism) each sequence is padded to a multiple
    of it, and ``cu_seqlens_padded`` (the padded offsets) comes along; ``max_seqlen`` is then
    the longest padded sequence. The total is padded to a multiple of ``pad_to_multiple_of``.
    """
    rows = [sequence_row(s["prompt"], s[key], pad_id) for key in ("chosen", "rejected") for s in samples]
    real_lengths = [len(x) for x, _, _ in rows]
    lengths = [_round_up(n, sequence_multiple_of) for n in real_lengths]
    real, used = sum(real_lengths), sum(lengths)
    multiple = pad_to_multiple_of or sequence_multiple_of
    if multiple % sequence_multiple_of:
        raise ValueError(
            f"pad_to_multiple_of ({multiple}) must be a multiple of sequence_multiple_of ({sequence_multiple_of})"
        )
    total = max(_round_up(used, multiple), multiple)
    if total > used:
        lengths.append(total - used)
        real_lengths.append(total - used)
    tokens = torch.full((total,), pad_id, dtype=torch.int64)
    labels = torch.full((total,), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros(total, dtype=torch.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for (x, y, mask), start in zip(rows, offsets):
        tokens[start : start + len(x)] = x
        labels[start : start + len(x)] = y
        loss_mask[start : start + len(x)] = mask
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    batch = {
        "tokens": tokens[None],
        "labels": labels[None],
        "loss_mask": loss_mask[None],
        "position_ids": position_ids[None],
        "segment_ids": segment_ids[None],
        "cu_seqlens": torch.from_numpy(np.concatenate([[0], np.cumsum(real_lengths)]).astype(np.int32)),
        "max_seqlen": int(max(lengths)),
        "num_pairs": len(samples),
        "num_tokens": real,
    }
    if sequence_multiple_of > 1:
        batch["cu_seqlens_padded"] = torch.from_numpy(offsets.astype(np.int32))
    return batch


def packed_micro_batches(
    samples: Sequence[PairSample],
    budget: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    count_multiple_of: int = 1,
    sequence_multiple_of: int = 1,
) -> list[dict]:
    """This rank's packed micro-batches of one global batch (``samples``: all its pairs).

    Every rank returns the same number of micro-batches (a multiple of ``count_multiple_of``),
    padded with empty ones. ``sequence_multiple_of``: see ``collate_packed``.
    """
    sizes = [pair_tokens(s, sequence_multiple_of) for s in samples]
    shares = balance_over_ranks(sizes, data_parallel_size)
    plans = [[[share[i] for i in b] for b in pack_first_fit([sizes[i] for i in share], budget)] for share in shares]
    count = max(len(p) for p in plans)
    count = -(-max(count, 1) // count_multiple_of) * count_multiple_of
    mine = plans[data_parallel_rank]
    mine = mine + [[] for _ in range(count - len(mine))]
    return [collate_packed([samples[i] for i in b], pad_id, pad_to_multiple_of, sequence_multiple_of) for b in mine]
