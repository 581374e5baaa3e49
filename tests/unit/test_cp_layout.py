"""Context parallelism: our sequence layout is megatron-core's, and bad sizes fail at start.

The batch split and the attention mask use ``local_positions``; megatron-core places RoPE
with ``get_pos_emb_on_this_cp_rank`` and splits Megatron-LM's batches with
``get_batch_on_this_cp_rank``. If the three disagreed, tokens would be rotated by the wrong
positions or attend to the wrong keys; these tests pin them to each other.
"""

import pytest
import torch

from simpo_megatron.config import ConfigError, SimPOConfig
from simpo_megatron.model.context_parallel import local_positions, split_for_context_parallel


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
    values = dict(mock_data=True, num_layers=4, hidden_size=256, num_attention_heads=8, micro_batch_size=2,
                  global_batch_size=8, seq_length=256, context_parallel_size=2)
    values.update(overrides)
    return SimPOConfig.from_flat(values)


@pytest.mark.parametrize("world, overrides, needles", [
    (2, dict(seq_length=250), ["--seq-length (250)", "2 x --context-parallel-size (4)"]),
    (8, dict(context_parallel_size=4, seq_length=260), ["--seq-length (260)", "(8)"]),
    (3, dict(), ["world size 3", "--context-parallel-size (2)"]),
    (8, dict(tensor_model_parallel_size=2, context_parallel_size=3), ["world size 8", "--context-parallel-size (3)"]),
    (4, dict(context_parallel_size=4, num_attention_heads=6, hidden_size=384, cp_comm_type="a2a"),
     ["--cp-comm-type a2a", "(6)", "--context-parallel-size (4)"]),
    (8, dict(tensor_model_parallel_size=4, sequence_parallel=True, seq_length=36),
     ["--seq-length (36)", "--tensor-model-parallel-size (4) x --context-parallel-size (2)"]),
    (4, dict(global_batch_size=3, micro_batch_size=1),
     ["--global-batch-size (3)", "data-parallel size (2)"]),
], ids=["seq_vs_2cp", "seq_vs_2cp4", "world", "world_tp", "a2a_heads", "sp", "dp_counts_cp_out"])
def test_configuration_errors_name_the_flags(world, overrides, needles):
    with pytest.raises(ConfigError) as info:
        _cfg(**overrides).validate(world)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def test_valid_layouts_pass():
    _cfg().validate(2)  # CP=2 alone
    _cfg(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, global_batch_size=4).validate(16)  # DP=2
    assert _cfg(tensor_model_parallel_size=2).data_parallel_size(8) == 2
    _cfg(context_parallel_size=1, seq_length=255).validate(1)  # no CP: any length
