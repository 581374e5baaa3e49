"""Context parallelism: our sequence layout is megatron-core's, and bad sizes fail at start.

The batch split and the attention mask use ``local_positions``; megatron-core places RoPE
with ``get_pos_emb_on_this_cp_rank`` and splits Megatron-LM's batches with
``get_batch_on_this_cp_rank``. If the three disagreed, tokens would be rotated by the wrong
positions or attend to the wrong keys; these tests pin them to each other.

Packed (THD) micro-batches: ``thd_partition_indices`` against a transcription of Transformer
Engine's ``thd_partition_indices_kernel`` (what megatron-core's ``get_thd_batch_on_this_cp_rank``
calls), megatron-core's THD rotary embedding on the split row against rotating the whole row,
the padding of the packed ``collate`` for CP, and the arguments ``forward_step`` gives the model
against ``get_thd_batch_on_this_cp_rank``'s.
"""

import pytest
import torch

from simpo_megatron.config import ConfigError, SimPOConfig
from simpo_megatron.model.context_parallel import (
    local_positions,
    split_for_context_parallel,
    split_packed_for_context_parallel,
    thd_partition_indices,
)
from simpo_megatron.testing import tiny_config


class _Group:
    """Stands in for a process group of ``size`` ranks as seen from ``rank``."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


LAYOUTS = [(cp, rank, seq) for cp, seq in ((2, 8), (2, 36), (4, 32)) for rank in range(cp)]


@pytest.mark.parametrize("cp, rank, seq", LAYOUTS)
def test_split_is_megatrons_batch_split(monkeypatch, cp, rank, seq):
    import megatron.core.utils as mcore_utils

    monkeypatch.setattr(mcore_utils, "get_pg_size", lambda group: group.size())
    monkeypatch.setattr(mcore_utils, "get_pg_rank", lambda group: group.rank())
    tokens = torch.arange(3 * seq).reshape(3, seq)
    theirs = mcore_utils.get_batch_on_this_cp_rank({"tokens": tokens.clone()}, _Group(cp, rank))["tokens"]
    torch.testing.assert_close(split_for_context_parallel(tokens, cp, rank), theirs)
    torch.testing.assert_close(local_positions(seq, cp, rank).expand(3, -1), theirs % seq)


@pytest.mark.parametrize("cp, rank, seq", LAYOUTS)
def test_positions_are_those_megatron_rotates_by(cp, rank, seq):
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from simpo_megatron.runtime import _CudaToCpuMode

    table = torch.arange(seq, dtype=torch.float32).reshape(seq, 1, 1, 1)  # the rotary table's layout
    with _CudaToCpuMode():  # it pins memory and calls .cuda()
        theirs = get_pos_emb_on_this_cp_rank(table, 0, _Group(cp, rank))
    torch.testing.assert_close(local_positions(seq, cp, rank), theirs.flatten().long())


def test_ranks_cover_the_sequence_once_and_balance_causal_work():
    seq, cp = 48, 3
    parts = [local_positions(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    # Causal attention work of a query is its position + 1 keys: the same on every rank.
    assert len({int((p + 1).sum()) for p in parts}) == 1


def test_split_refuses_a_length_that_is_not_a_multiple():
    with pytest.raises(ValueError, match=r"sequence length 10 .* 2 x context-parallel size \(4\)"):
        split_for_context_parallel(torch.zeros(2, 10), 2, 0)


def _cfg(**overrides) -> SimPOConfig:
    values = dict(
        mock_data=True,
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        micro_batch_size=2,
        global_batch_size=8,
        seq_length=256,
        context_parallel_size=2,
    )
    values.update(overrides)
    return SimPOConfig.from_flat(values)


@pytest.mark.parametrize(
    "world, overrides, needles",
    [
        (2, dict(seq_length=250), ["--seq-length (250)", "2 x --context-parallel-size (4)"]),
        (8, dict(context_parallel_size=4, seq_length=260), ["--seq-length (260)", "(8)"]),
        (3, dict(), ["world size 3", "--context-parallel-size (2)"]),
        (
            8,
            dict(tensor_model_parallel_size=2, context_parallel_size=3),
            ["world size 8", "--context-parallel-size (3)"],
        ),
        (
            4,
            dict(context_parallel_size=4, num_attention_heads=6, hidden_size=384, cp_comm_type="a2a"),
            ["--cp-comm-type a2a", "(6)", "--context-parallel-size (4)"],
        ),
        (
            8,
            dict(tensor_model_parallel_size=4, sequence_parallel=True, seq_length=36),
            ["--seq-length (36)", "--tensor-model-parallel-size (4) x --context-parallel-size (2)"],
        ),
        (4, dict(global_batch_size=3, micro_batch_size=1), ["--global-batch-size (3)", "data-parallel size (2)"]),
        (
            2,
            dict(packing=True, transformer_impl="transformer_engine", cp_comm_type="allgather"),
            ["--cp-comm-type allgather", "--packing"],
        ),
    ],
    ids=["seq_vs_2cp", "seq_vs_2cp4", "world", "world_tp", "a2a_heads", "sp", "dp_counts_cp_out", "thd_allgather"],
)
def test_configuration_errors_name_the_flags(world, overrides, needles):
    with pytest.raises(ConfigError) as info:
        _cfg(**overrides).validate(world)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def test_valid_layouts_pass():
    _cfg().validate(2)  # CP=2 alone
    _cfg(packing=True).validate(2)  # packed (THD) CP on the local layers
    _cfg(packing=True, transformer_impl="transformer_engine").validate(2)  # and on TE's p2p
    _cfg(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, global_batch_size=4).validate(16)  # DP=2
    assert _cfg(tensor_model_parallel_size=2).data_parallel_size(8) == 2
    _cfg(context_parallel_size=1, seq_length=255).validate(1)  # no CP: any length


# ------------------------------------------------------------------ packed (THD) layout
def _te_partitioned_indices(cu_seqlens_padded, total_tokens, world_size, rank):
    """Transformer Engine's ``thd_partition_indices_kernel``, one token at a time."""
    cu = [int(c) // world_size for c in cu_seqlens_padded]
    out = []
    for token in range(total_tokens // world_size):
        seq = max(i for i in range(len(cu) - 1) if cu[i] <= token)  # its binary search
        seq_len = cu[seq + 1] - cu[seq]
        index = token - cu[seq]
        offset = rank if index < seq_len // 2 else (world_size - 1) * 2 - rank
        out.append(index + cu[seq] * world_size + seq_len // 2 * offset)
    return torch.tensor(out)


PACKED = [
    (cp, rank, lengths)
    for cp, lengths in ((2, (8, 4, 12, 4)), (2, (16,)), (3, (6, 18, 12)), (4, (8, 40)))
    for rank in range(cp)
]


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("cp, rank, lengths", PACKED)
def test_packed_split_is_transformer_engines(cp, rank, lengths):
    cu = _offsets(lengths)
    mine = thd_partition_indices(cu, cp, rank)
    torch.testing.assert_close(mine, _te_partitioned_indices(cu, int(cu[-1]), cp, rank))
    row = torch.arange(int(cu[-1]))[None] * 10
    torch.testing.assert_close(split_packed_for_context_parallel(row, cu, cp, rank), row[:, mine])


def test_packed_ranks_hold_a_share_of_every_sequence():
    lengths, cp = (8, 4, 12, 4), 2
    cu = _offsets(lengths)
    parts = [thd_partition_indices(cu, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(int(cu[-1])))
    seq_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    for part in parts:
        assert torch.bincount(seq_of[part], minlength=len(lengths)).tolist() == [n // cp for n in lengths]


def test_packed_split_refuses_unpadded_sequences():
    with pytest.raises(ValueError, match=r"sequence length 6 .* \(4\)"):
        thd_partition_indices(_offsets((8, 6, 2)), 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens_padded ends at 8"):
        split_packed_for_context_parallel(torch.zeros(1, 12), _offsets((8,)), 2, 0)


@pytest.mark.parametrize("cp, rank, lengths", PACKED)
def test_packed_rope_rotates_each_chunk_by_its_position_in_its_sequence(cp, rank, lengths):
    """megatron-core's THD RoPE on this rank's split row (with the padded cu_seqlens, as its
    attention passes them) equals rotating the whole packed row, positions restarting per
    sequence, then splitting it."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    cu = _offsets(lengths)
    dim, total = 8, int(cu[-1])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(max(lengths), dtype=torch.float32), inv_freq)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [max_s, 1, 1, d], RotaryEmbedding's
    t = torch.randn(total, 2, dim, generator=torch.Generator().manual_seed(cp * 10 + rank))
    whole = _apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=_Group(1, 0))
    index = thd_partition_indices(cu, cp, rank)
    local = _apply_rotary_pos_emb_thd(t[index], cu, freqs, cp_group=_Group(cp, rank))
    torch.testing.assert_close(local, whole[index])


def _samples():
    import numpy as np

    def ids(n, start):
        return np.arange(start, start + n, dtype=np.int64)

    # Sequence lengths 7, 3, 16 (chosen) and 6, 2, 14 (rejected): 3 and 2 are shorter than 2 x CP.
    return [
        {"prompt": ids(5, 3), "chosen": ids(2, 40), "rejected": ids(1, 60)},
        {"prompt": ids(1, 3), "chosen": ids(2, 80), "rejected": ids(1, 90)},
        {"prompt": ids(2, 3), "chosen": ids(14, 100), "rejected": ids(12, 150)},
    ]


def test_collate_pads_every_sequence_for_context_parallelism():
    from simpo_megatron.data.batch import BatchLayout, collate
    from simpo_megatron.data.packing import pair_tokens

    samples = _samples()
    plain = collate(samples, BatchLayout(0, packed=True))
    batch = collate(samples, BatchLayout(0, pad_to_multiple_of=24, packed=True, sequence_multiple_of=4))
    layout = batch.packed
    assert layout.cu_seqlens_padded.tolist() == [0, 8, 12, 28, 36, 40, 56, 72]  # + a tail of 16
    assert layout.cu_seqlens.tolist() == [0, 7, 10, 26, 32, 34, 48, 64]  # real lengths (TE's convention)
    assert batch.tokens.shape == (1, 72) and layout.max_seqlen == 16
    assert [pair_tokens(s, 4) for s in samples] == [16, 8, 32]
    assert batch.num_tokens == plain.num_tokens == 48
    starts, ends = layout.cu_seqlens_padded[:-1].tolist(), layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    real = [torch.arange(a, a + int(n)) for a, n in zip(starts, ends)][:6]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):  # the real tokens, unchanged
        torch.testing.assert_close(getattr(batch, key)[0, torch.cat(real)], getattr(plain, key)[0, :48], msg=key)
    padding = torch.ones(72, dtype=torch.bool)
    padding[torch.cat(real)] = False
    assert batch.loss_mask[0, padding].sum() == 0
    seq = layout.segment_ids[0]
    assert seq[:8].tolist() == [0] * 8 and seq[56:].tolist() == [6] * 16  # padding in its sequence; the tail
    assert batch.position_ids[0, :8].tolist() == list(range(8))
    with pytest.raises(ValueError, match=r"pad_to_multiple_of \(6\) must be a multiple of sequence_multiple_of \(4\)"):
        collate(samples, BatchLayout(0, pad_to_multiple_of=6, packed=True, sequence_multiple_of=4))
    assert plain.packed.cu_seqlens_padded is None


@pytest.mark.parametrize("rank", [0, 1])
def test_forward_step_feeds_the_model_megatrons_thd_split(monkeypatch, rank):
    """``forward_step`` on a packed micro-batch at CP=2 gives the model what megatron-core's
    ``get_thd_batch_on_this_cp_rank`` gives (its Transformer Engine index kernel transcribed)."""
    from types import SimpleNamespace

    import megatron.core.utils as mcore_utils

    from simpo_megatron.data.batch import BatchLayout, collate
    from simpo_megatron.training import step

    batch = collate(_samples(), BatchLayout(0, pad_to_multiple_of=8, packed=True, sequence_multiple_of=4))
    monkeypatch.setattr(step, "_context_parallel_group", lambda: _Group(2, rank))
    seen = {}

    class Model:
        post_process, logprob_chunk_size = True, 0

        def __call__(self, tokens, position_ids, attention_mask, labels, packed_seq_params):
            seen.update(tokens=tokens, position_ids=position_ids, params=packed_seq_params)
            return None

    settings = tiny_config(context_parallel_size=2, packing=True).loss
    _, loss_fn = step.forward_step(settings, 200, iter([batch]), Model())
    fake_tex = SimpleNamespace(thd_get_partitioned_indices=_te_partitioned_indices)
    monkeypatch.setattr(mcore_utils, "tex", fake_tex)
    monkeypatch.setattr(mcore_utils, "is_te_min_version", lambda version: True)
    fields = {k: getattr(batch, k).clone() for k in ("tokens", "position_ids", "labels", "loss_mask")}
    theirs, params = mcore_utils.get_thd_batch_on_this_cp_rank(
        {**fields, "segment_ids": batch.packed.segment_ids.clone()},
        batch.packed.cu_seqlens,
        batch.packed.cu_seqlens_padded,
        torch.tensor([batch.packed.max_seqlen]),
        cp_size=2,
        cp_rank=rank,
    )
    torch.testing.assert_close(seen["tokens"], theirs["tokens"])
    torch.testing.assert_close(seen["position_ids"], theirs["position_ids"])
    for field in ("qkv_format", "max_seqlen_q", "max_seqlen_kv"):
        assert getattr(seen["params"], field) == getattr(params, field), field
    for field in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        torch.testing.assert_close(getattr(seen["params"], field), getattr(params, field), msg=field)
    torch.testing.assert_close(loss_fn.args[2], theirs["labels"])  # partial(loss_func, settings, vocab, labels, mask)
    torch.testing.assert_close(loss_fn.args[3], theirs["loss_mask"])
    torch.testing.assert_close(loss_fn.keywords["segments"][0], theirs["segment_ids"])
