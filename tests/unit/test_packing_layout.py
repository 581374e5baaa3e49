"""Packing pairs into THD micro-batches: plans, layout, per-sequence log-probs, attention."""

import numpy as np
import pytest
import torch

from simpo_megatron.data.batch import BatchLayout, collate
from simpo_megatron.data.packing import balance_over_ranks, pack_first_fit, packed_micro_batches, pair_tokens
from simpo_megatron.logprobs import segment_logps, sequence_logps

PAD = 0


def _pair(p, c, r, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.integers(3, 50, n).astype(np.int64) for k, n in (("prompt", p), ("chosen", c), ("rejected", r))}


PAIRS = [_pair(3, 4, 2, 0), _pair(5, 1, 6, 1), _pair(2, 2, 2, 2)]


def test_balance_and_first_fit():
    sizes = [9, 1, 5, 5, 3, 7]
    shares = balance_over_ranks(sizes, 2)
    assert sorted(i for s in shares for i in s) == list(range(6))
    assert sorted(sum(sizes[i] for i in s) for s in shares) == [15, 15]
    bins = pack_first_fit(sizes, 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(sizes[i] for i in b) <= 10 for b in bins) and len(bins) == 3
    with pytest.raises(ValueError, match="budget"):
        pack_first_fit([11], 10)


def test_packed_layout_matches_unpacked_rows():
    packed = collate(PAIRS, BatchLayout(PAD, pad_to_multiple_of=8, packed=True))
    rows = collate(PAIRS, BatchLayout(PAD, seq_length=16))
    lengths = [len(s["prompt"]) + len(s[k]) for k in ("chosen", "rejected") for s in PAIRS]
    real = sum(lengths)
    layout = packed.packed
    assert packed.num_tokens == real == rows.num_tokens
    assert packed.tokens.shape == (1, 40)  # 37 tokens rounded up to 8
    assert layout.cu_seqlens.tolist() == np.cumsum([0, *lengths, 40 - real]).tolist()
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == max(lengths)
    for seq, (start, n) in enumerate(zip(layout.cu_seqlens.tolist(), lengths)):
        sl = slice(start, start + n)
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(getattr(packed, key)[0, sl], getattr(rows, key)[seq, :n]), key
        assert packed.position_ids[0, sl].tolist() == list(range(n))  # positions restart
        assert torch.all(layout.segment_ids[0, sl] == seq)
    assert torch.all(layout.segment_ids[0, real:] == 2 * len(PAIRS))
    assert packed.loss_mask[0, real:].sum() == 0

    # Per-sequence log-probs from segment sums equal the row-wise ones.
    gen = torch.Generator().manual_seed(0)
    row_logps = -torch.rand(rows.tokens.shape, generator=gen)
    packed_logps = torch.zeros(1, 40)
    for seq, (start, n) in enumerate(zip(layout.cu_seqlens.tolist(), lengths)):
        packed_logps[0, start : start + n] = row_logps[seq, :n]
    for average in (True, False):
        expected = sequence_logps(row_logps, rows.loss_mask, average)
        got = segment_logps(packed_logps, packed.loss_mask, layout.segment_ids, 2 * len(PAIRS), average)
        torch.testing.assert_close(got, expected)


def test_every_rank_gets_the_same_number_of_micro_batches():
    pairs = [_pair(10, 10, 10, i) for i in range(3)] + [_pair(2, 1, 1, 9)]
    sizes = [pair_tokens(p) for p in pairs]
    assert sizes == [40, 40, 40, 6]
    per_rank = [packed_micro_batches(pairs, 64, r, 2, PAD, 8) for r in range(2)]
    # Rank 0 takes two big pairs (two micro-batches), rank 1 one big and the small one, which
    # share one micro-batch: rank 1 is padded with an empty one.
    assert [[b.num_pairs for b in mbs] for mbs in per_rank] == [[1, 1], [2, 0]]
    per_rank = [packed_micro_batches(pairs, 128, r, 2, PAD, 8) for r in range(2)]
    assert [[b.num_pairs for b in mbs] for mbs in per_rank] == [[2], [2]]
    # A rank with less to do is padded with empty micro-batches (one padding segment).
    per_rank = [packed_micro_batches(pairs[:3], 64, r, 2, PAD, 8, count_multiple_of=1) for r in range(2)]
    counts = [[b.num_pairs for b in mbs] for mbs in per_rank]
    assert counts == [[1, 1], [1, 0]]
    empty = per_rank[1][1]
    assert empty.tokens.shape == (1, 8) and empty.loss_mask.sum() == 0
    assert empty.packed.cu_seqlens.tolist() == [0, 8] and empty.num_tokens == 0
    assert [len(packed_micro_batches(pairs, 128, r, 1, PAD, 8, count_multiple_of=2)) for r in range(1)] == [2]


def test_packed_attention_ignores_neighbours():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from simpo_megatron.model.attention import SDPAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2, attention_dropout=0.0
    )
    attn = SDPAttention(config, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7]
    t = sum(lengths)
    q = torch.randn(t, 4, 4, generator=gen)
    k, v = torch.randn(t, 2, 4, generator=gen), torch.randn(t, 2, 4, generator=gen)
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (t, 1, 16)
    # The middle sequence alone gives the same context; changing its neighbours changes nothing.
    alone = attn(q[5:8, None], k[5:8, None], v[5:8, None], None)
    torch.testing.assert_close(out[5:8], alone)
    k2, v2 = k.clone(), v.clone()
    k2[:5] += 1.0
    v2[8:] -= 1.0
    torch.testing.assert_close(attn(q, k2, v2, None, packed_seq_params=params)[5:8], out[5:8])
