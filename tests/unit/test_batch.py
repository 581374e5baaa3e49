"""MicroBatch: reference scores through every layout, padding to a width, moving to a device."""

import dataclasses

import numpy as np
import pytest
import torch

from simpo_megatron.data.batch import BatchLayout, MicroBatch, ReferenceScores, collate
from simpo_megatron.data.packing import packed_micro_batches

PAD = 0


def _pair(i: int, p: int, c: int, r: int, reference: bool = True) -> dict:
    """Pair ``i``: token ids that say which pair they belong to, and reference scores that do too."""
    sample = {
        "prompt": np.full(p, 10 + i, dtype=np.int64),
        "chosen": np.full(c, 100 + i, dtype=np.int64),
        "rejected": np.full(r, 200 + i, dtype=np.int64),
    }
    if reference:
        sample["reference"] = np.array([-1.5 * i - 0.25, -2.5 * i - 0.75, c, r], dtype=np.float64)
    return sample


PAIRS = [_pair(0, 3, 2, 4), _pair(1, 2, 5, 1), _pair(2, 4, 1, 2)]


def _expected(pairs) -> list[list[float]]:
    return [[s["reference"][k] for s in pairs] for k in range(4)]


def _columns(ref: ReferenceScores) -> list[list[float]]:
    return [
        ref.chosen_logps.tolist(),
        ref.rejected_logps.tolist(),
        ref.chosen_tokens.tolist(),
        ref.rejected_tokens.tolist(),
    ]


def test_reference_scores_follow_the_pairs_when_padded():
    batch = collate(PAIRS, BatchLayout(PAD, seq_length=16))
    ref = batch.reference
    assert ref.chosen_logps.dtype == torch.float64 and ref.chosen_tokens.dtype == torch.int64
    assert _columns(ref) == _expected(PAIRS)
    # Token counts agree with the loss mask of each pair's rows (chosen rows first).
    assert batch.loss_mask.sum(-1).tolist() == ref.chosen_tokens.tolist() + ref.rejected_tokens.tolist()
    assert collate([_pair(0, 3, 2, 4, reference=False)], BatchLayout(PAD, seq_length=16)).reference is None


def test_padding_pairs_take_the_fillers_scores_and_zero_weight():
    filler = _pair(7, 2, 2, 2)
    batch = collate(PAIRS[:2], BatchLayout(PAD, seq_length=16, pairs=4, filler=filler))
    assert batch.num_pairs == 2 and batch.rows == 8
    assert batch.pair_weights.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert _columns(batch.reference) == _expected(PAIRS[:2] + [filler, filler])
    assert batch.num_tokens == sum(2 * len(s["prompt"]) + len(s["chosen"]) + len(s["rejected"]) for s in PAIRS[:2])


def test_packed_micro_batches_keep_pair_order_and_empty_ones_have_empty_scores():
    pairs = [_pair(i, 10, 10, 10) for i in range(3)] + [_pair(3, 2, 1, 1)]
    per_rank = [packed_micro_batches(pairs, 64, r, 2, PAD, 8) for r in range(2)]
    seen = []
    for batch in (b for mbs in per_rank for b in mbs):
        ref = batch.reference
        assert ref is not None and ref.chosen_logps.shape == (batch.num_pairs,)
        # Pair k of the micro-batch: its chosen sequence is segment k, whose response ids name the pair.
        segments, labels, mask = batch.packed.segment_ids[0], batch.labels[0], batch.loss_mask[0]
        for k in range(batch.num_pairs):
            pair = int(labels[(segments == k) & (mask > 0)][0]) - 100
            assert [column[k] for column in _columns(ref)] == [row[0] for row in _expected([pairs[pair]])]
            seen.append(pair)
    assert sorted(seen) == [0, 1, 2, 3]
    empty = per_rank[1][1]
    assert empty.num_pairs == 0 and empty.reference.chosen_logps.shape == (0,)


def test_reference_must_be_on_every_pair_and_shaped_4():
    mixed = [PAIRS[0], _pair(1, 2, 2, 2, reference=False)]
    with pytest.raises(ValueError, match="1 of 2 samples lack 'reference'"):
        collate(mixed, BatchLayout(PAD, seq_length=16))
    bad = dict(PAIRS[0], reference=np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        collate([bad], BatchLayout(PAD, seq_length=16))
    fractional = dict(PAIRS[0], reference=np.array([-1.0, -2.0, 2.5, 4.0]))
    with pytest.raises(ValueError, match="whole numbers"):
        collate([fractional], BatchLayout(PAD, seq_length=16))


@pytest.mark.parametrize("packed", [False, True])
def test_padded_to_adds_masked_columns_only(packed):
    if packed:
        layout = BatchLayout(PAD, pad_to_multiple_of=8, packed=True)
    else:
        layout = BatchLayout(PAD, seq_length=16, pad_to_multiple_of=8)
    batch = collate(PAIRS, layout)
    width = batch.width
    wider = batch.padded_to(width + 5)
    assert wider.width == width + 5 and batch.padded_to(width) is batch
    for key in ("tokens", "labels", "loss_mask"):
        assert torch.equal(getattr(wider, key)[:, :width], getattr(batch, key)), key
        assert getattr(wider, key)[:, width:].abs().sum() == 0, key
    assert (wider.num_pairs, wider.num_tokens) == (batch.num_pairs, batch.num_tokens)
    if packed:
        cu = wider.packed.cu_seqlens.tolist()
        assert cu[:-1] == batch.packed.cu_seqlens.tolist() and cu[-1] == width + 5
        assert wider.packed.segment_ids[0, width:].tolist() == [2 * len(PAIRS)] * 5  # one more padding segment
        assert wider.position_ids[0, width:].tolist() == list(range(5))
    else:
        assert torch.equal(wider.position_ids, torch.arange(width + 5).expand(batch.rows, -1))
    with pytest.raises(ValueError, match="cannot pad"):
        batch.padded_to(width - 1)


def test_to_moves_every_tensor_and_seq_params_describe_the_row():
    batch = collate(PAIRS, BatchLayout(PAD, pad_to_multiple_of=8, packed=True, sequence_multiple_of=4))
    moved = batch.to("meta")
    parts = (moved, moved.packed, moved.reference)
    tensors = [
        getattr(p, f.name) for p in parts for f in dataclasses.fields(p) if isinstance(getattr(p, f.name), torch.Tensor)
    ]
    assert len(tensors) == 5 + 3 + 4  # the row's 5, the packed layout's 3, the reference's 4
    assert all(t.device.type == "meta" for t in tensors)
    assert isinstance(moved, MicroBatch) and batch.tokens.device.type == "cpu"
    params = batch.packed.seq_params()
    assert params.qkv_format == "thd" and params.max_seqlen_q == batch.packed.max_seqlen
    assert params.cu_seqlens_q is batch.packed.cu_seqlens
    assert params.cu_seqlens_kv_padded is batch.packed.cu_seqlens_padded


def test_token_mask_marks_the_real_tokens_in_every_layout():
    """Prompt and response tokens are 1, every padding (row ends, per-sequence CP padding, the
    packed tail, padded_to's columns) is 0: what the router load-balancing loss counts."""
    layouts = (
        BatchLayout(PAD, seq_length=16),
        BatchLayout(PAD, seq_length=16, pairs=5, filler=PAIRS[0]),
        BatchLayout(PAD, packed=True),
        BatchLayout(PAD, pad_to_multiple_of=8, packed=True, sequence_multiple_of=4),
    )
    for layout in layouts:
        batch = collate(PAIRS, layout)
        wider = batch.padded_to(batch.width + 3)
        for b in (batch, wider):
            mask = b.token_mask
            assert mask.sum() == b.num_tokens, layout  # padding pairs (evaluation) are padding too
            # Every label the loss reads from a real pair comes from a real token.
            real_rows = torch.ones(b.rows, dtype=torch.bool)
            if b.pair_weights is not None:
                real_rows = (b.pair_weights > 0).repeat(2)
            assert torch.all(mask[real_rows][b.loss_mask[real_rows] > 0] == 1), layout
            if b.packed is not None:
                seq = b.packed.segment_ids[0]
                assert torch.all(mask[0, seq == 2 * b.num_pairs] == 0), layout


def test_layout_errors_name_the_argument():
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        BatchLayout(PAD, seq_length=8, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="needs seq_length"):
        BatchLayout(PAD)
    with pytest.raises(ValueError, match="filler"):
        BatchLayout(PAD, seq_length=8, pairs=2)
    with pytest.raises(ValueError, match="do not fit"):
        collate(PAIRS, BatchLayout(PAD, seq_length=16, pairs=2, filler=PAIRS[0]))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sft_on_prompt_covers_every_label_of_each_chosen_sequence(packed):
    """With --sft-on-prompt the SFT term's labels are the prompt's and the response's (all but a
    sequence's first token, as TRL's ORPO NLL), on the chosen rows only, never on padding."""
    from simpo_megatron.training.step import chosen_response_mask, chosen_token_count, sft_token_mask

    layout = BatchLayout(seq_length=16, pad_id=PAD, pad_to_multiple_of=8, packed=packed, sequence_multiple_of=4)
    batch = collate(PAIRS, layout)
    mask = sft_token_mask(batch, on_prompt=True)
    assert torch.equal(sft_token_mask(batch, on_prompt=False), batch.loss_mask)
    # Every label the mask covers is a token of its own sequence; none is padding.
    covered = batch.labels[mask > 0]
    assert (covered != PAD).all()
    if packed:
        segments = batch.packed.segment_ids
        chosen = chosen_response_mask(mask, len(PAIRS), segment_ids=segments)
        per_sequence = [int(mask[segments == k].sum()) for k in range(2 * len(PAIRS))]
    else:
        chosen = chosen_response_mask(mask, len(PAIRS))
        per_sequence = mask.sum(1).int().tolist()
    lengths = [len(s["prompt"]) + len(s[side]) - 1 for side in ("chosen", "rejected") for s in PAIRS]
    assert per_sequence == lengths
    assert chosen.sum() == chosen_token_count(batch, on_prompt=True) == sum(lengths[: len(PAIRS)])
    assert chosen_token_count(batch) == sum(len(s["chosen"]) for s in PAIRS)
