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

import dataclasses
from collections.abc import Sequence

from simpo_megatron.data.batch import REFERENCE_KEY, BatchLayout, MicroBatch, PairSample, ReferenceScores, collate
from simpo_megatron.mathutil import round_up


def pair_tokens(sample: PairSample, sequence_multiple_of: int = 1) -> int:
    """Tokens a pair takes when packed: prompt + chosen and prompt + rejected, each rounded up
    to ``sequence_multiple_of``."""
    prompt = len(sample["prompt"])
    return sum(round_up(prompt + len(sample[key]), sequence_multiple_of) for key in ("chosen", "rejected"))


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


def packed_micro_batches(
    samples: Sequence[PairSample],
    budget: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    count_multiple_of: int = 1,
    sequence_multiple_of: int = 1,
) -> list[MicroBatch]:
    """This rank's packed micro-batches of one global batch (``samples``: all its pairs).

    Every rank returns the same number of micro-batches (a multiple of ``count_multiple_of``),
    padded with empty ones (which carry empty reference scores when the pairs carry them).
    ``pad_to_multiple_of`` and ``sequence_multiple_of``: see ``BatchLayout``.
    """
    sizes = [pair_tokens(s, sequence_multiple_of) for s in samples]
    shares = balance_over_ranks(sizes, data_parallel_size)
    plans = [[[share[i] for i in b] for b in pack_first_fit([sizes[i] for i in share], budget)] for share in shares]
    count = max(len(p) for p in plans)
    count = round_up(max(count, 1), count_multiple_of)
    mine = plans[data_parallel_rank]
    mine = mine + [[] for _ in range(count - len(mine))]
    layout = BatchLayout(
        pad_id, pad_to_multiple_of=pad_to_multiple_of, packed=True, sequence_multiple_of=sequence_multiple_of
    )
    batches = [collate([samples[i] for i in b], layout) for b in mine]
    if any(REFERENCE_KEY in s for s in samples):
        empty = ReferenceScores.stack([])
        batches = [b if b.num_pairs else dataclasses.replace(b, reference=empty) for b in batches]
    return batches
