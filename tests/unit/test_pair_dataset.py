"""PreferencePairDataset (truncation) and collate (micro-batch layout, labels, masks)."""

from functools import partial

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from simpo_megatron.data import BatchLayout, PairBatchSampler, PreferencePairDataset, collate
from simpo_megatron.data.pair_dataset import truncation_lengths

BOS, EOS, PAD = 1, 2, 0


def write_pairs(prefix: str, pairs: list[tuple[list[int], list[int], list[int]]]) -> str:
    """Write pairs as megatron's builder does: one document of 3 sequences per pair."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for pair in pairs:
        for sequence in pair:
            builder.add_item(torch.tensor(sequence, dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def make_pair(prompt_len: int, chosen_len: int, rejected_len: int, tag: int = 0):
    """Distinct, recognizable tokens: prompt 100.., chosen 200.., rejected 300.. (+1000*tag)."""
    base = 1000 * tag
    prompt = [BOS] + [base + 100 + k for k in range(prompt_len - 1)]
    chosen = [base + 200 + k for k in range(chosen_len - 1)] + [EOS]
    rejected = [base + 300 + k for k in range(rejected_len - 1)] + [EOS]
    return prompt, chosen, rejected


@pytest.mark.parametrize(
    "lengths, seq_length, max_prompt_length, expected",
    [
        ((3, 2, 4), 10, None, (3, 2, 4)),  # fits: untouched
        ((4, 2, 6), 10, None, (4, 2, 6)),  # exactly seq_length: untouched
        ((6, 3, 2), 8, None, (5, 3, 2)),  # the prompt yields only what is needed
        ((6, 6, 2), 8, None, (2, 6, 2)),  # ... down to a short prompt
        # --max-prompt-length (TRL / SimPO recipes): on overflow the prompt is cut to at most
        # that many tokens, then the responses to the room left.
        ((6, 6, 2), 8, 4, (4, 4, 2)),
        ((6, 3, 2), 8, 4, (4, 3, 2)),  # cut to 4 although 5 would fit, as TRL cuts
        ((3, 6, 2), 8, 4, (3, 5, 2)),  # a prompt shorter than the limit stays whole
        ((8, 2, 2), 10, 4, (8, 2, 2)),  # no overflow: a long prompt is not cut
        ((9, 2, 3), 10, 4, (4, 2, 3)),  # overflow by 2: down to the limit
        ((3, 20, 5), 8, 7, (3, 5, 5)),  # the limit above the prompt: only responses yield
        ((20, 20, 1), 8, 7, (7, 1, 1)),  # limit seq_length - 1: one response token left
        ((6, 10, 2), 8, None, (1, 7, 2)),  # prompt down to 1, then the response is cut
        ((3, 20, 5), 8, None, (1, 7, 5)),  # a response longer than seq_length
        ((5, 5, 5), 2, None, (1, 1, 1)),  # one token each is always left
    ],
)
def test_truncation_lengths(lengths, seq_length, max_prompt_length, expected):
    assert truncation_lengths(*lengths, seq_length, max_prompt_length) == expected


def _trl_truncation(prompt, chosen, rejected, max_length, max_prompt_length):
    """TRL's DPO/CPO tokenize_row (<= 0.11) and the SimPO repository's, truncation_mode='keep_end'."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        chosen = chosen[: max_length - max_prompt_length]
        rejected = rejected[: max_length - max_prompt_length]
    return prompt, chosen, rejected


@pytest.mark.parametrize("seed", range(3))
def test_truncation_matches_trl_keep_end_except_for_the_bos(tmp_path, seed):
    """Where the prompt is at least --max-prompt-length long, the kept lengths are TRL's, the
    responses are TRL's tokens, and the prompt is TRL's keep-end with its first token put back
    as the BOS. A shorter prompt leaves more room to the responses than TRL does, never less."""
    rng = np.random.default_rng(seed)
    pairs = [make_pair(*rng.integers(1, 30, size=3), tag=t % 5) for t in range(150)]
    seq_length, max_prompt = 24, 10
    ds = PreferencePairDataset(write_pairs(str(tmp_path / "d"), pairs), seq_length, max_prompt)
    compared = 0
    for (prompt, chosen, rejected), item in zip(pairs, ds):
        p, c, r = item["prompt"].tolist(), item["chosen"].tolist(), item["rejected"].tolist()
        tp, tc, tr = _trl_truncation(prompt, chosen, rejected, seq_length, max_prompt)
        assert len(p) + max(len(c), len(r)) <= seq_length and min(len(c), len(r)) >= 1
        if len(prompt) >= max_prompt or len(tp) + max(len(tc), len(tr)) == len(prompt) + max(
            len(chosen), len(rejected)
        ):
            assert (len(p), c, r) == (len(tp), tc, tr)
            assert p[0] == BOS and p[1:] == tp[1:]
            compared += 1
        else:  # short prompt, long response: TRL leaves seq_length - len(prompt) - len(response) unused
            assert p == prompt and len(c) >= len(tc) and len(r) >= len(tr)
            assert c == chosen[: len(c)] and r == rejected[: len(r)]
    assert compared > 100


def test_truncation_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="seq_length"):
        truncation_lengths(1, 1, 1, 1)
    with pytest.raises(ValueError, match="non-empty"):
        truncation_lengths(3, 0, 2, 8)
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncation_lengths(3, 9, 2, 8, max_prompt_length=8)


def test_dataset_reads_and_truncates(tmp_path):
    pairs = [make_pair(3, 2, 4), make_pair(6, 3, 2, tag=1), make_pair(4, 9, 2, tag=2)]
    ds = PreferencePairDataset(write_pairs(str(tmp_path / "d"), pairs), seq_length=8)
    assert len(ds) == 3

    item = ds[0]  # fits: exactly what was written
    for key, written in zip(("prompt", "chosen", "rejected"), pairs[0]):
        assert item[key].tolist() == written

    item = ds[1]  # 6 + 3 > 8: the prompt drops one token from the left but keeps its BOS
    assert item["prompt"].tolist() == [BOS, 1101, 1102, 1103, 1104]
    assert item["chosen"].tolist() == pairs[1][1]
    assert item["rejected"].tolist() == pairs[1][2]

    item = ds[2]  # 4 + 9 > 8: prompt down to BOS, chosen cut from the right to 7 tokens
    assert item["prompt"].tolist() == [BOS]
    assert item["chosen"].tolist() == pairs[2][1][:7]
    assert item["rejected"].tolist() == pairs[2][2]


def test_dataset_honors_max_prompt_length_and_indices(tmp_path):
    pairs = [make_pair(6, 6, 2, tag=t) for t in range(4)]
    prefix = write_pairs(str(tmp_path / "d"), pairs)
    ds = PreferencePairDataset(prefix, seq_length=8, max_prompt_length=4, indices=[3, 1])
    assert len(ds) == 2
    item = ds[0]
    assert item["prompt"].tolist() == [BOS, 3102, 3103, 3104]  # BOS + the last 3 tokens
    assert item["chosen"].tolist() == pairs[3][1][:4]
    assert item["rejected"].tolist() == pairs[3][2]
    assert ds[1]["prompt"].tolist() == [BOS, 1102, 1103, 1104]


def test_truncated_samples_always_fit_and_keep_responses(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [make_pair(*rng.integers(1, 40, size=3)) for _ in range(200)]
    seq_length = 24
    ds = PreferencePairDataset(write_pairs(str(tmp_path / "d"), pairs), seq_length)
    for (prompt, chosen, rejected), item in zip(pairs, ds):
        p, c, r = item["prompt"].tolist(), item["chosen"].tolist(), item["rejected"].tolist()
        assert min(len(p), len(c), len(r)) >= 1
        assert len(p) + max(len(c), len(r)) <= seq_length
        assert p[0] == BOS and p[1:] == prompt[len(prompt) - len(p) + 1 :]
        assert c == chosen[: len(c)] and r == rejected[: len(r)]
        if len(prompt) + max(len(chosen), len(rejected)) <= seq_length:
            assert (p, c, r) == (prompt, chosen, rejected)


def test_dataset_argument_and_format_errors(tmp_path):
    prefix = write_pairs(str(tmp_path / "d"), [make_pair(3, 2, 2)])
    with pytest.raises(ValueError, match="seq_length"):
        PreferencePairDataset(prefix, seq_length=1)
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferencePairDataset(prefix, seq_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="indices"):
        PreferencePairDataset(prefix, seq_length=8, indices=[1])
    with pytest.raises(ValueError, match=r"missing .*nothere\.bin"):
        PreferencePairDataset(str(tmp_path / "nothere"), seq_length=8)

    builder = IndexedDatasetBuilder(str(tmp_path / "two.bin"), dtype=np.int32)
    builder.add_item(torch.tensor([BOS, 5]))
    builder.add_item(torch.tensor([6, EOS]))
    builder.end_document()
    builder.finalize(str(tmp_path / "two.idx"))
    with pytest.raises(ValueError, match="exactly 3 sequences"):
        PreferencePairDataset(str(tmp_path / "two"), seq_length=8)

    empty = write_pairs(str(tmp_path / "empty"), [make_pair(3, 2, 2), ([BOS, 7], [], [EOS])])
    with pytest.raises(ValueError, match="pair 1 has an empty"):
        PreferencePairDataset(empty, seq_length=8)


def sample(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, np.ndarray]:
    return {
        "prompt": np.array(prompt, dtype=np.int32),
        "chosen": np.array(chosen, dtype=np.int32),
        "rejected": np.array(rejected, dtype=np.int32),
    }


def test_collate_layout_labels_and_masks():
    samples = [sample(*make_pair(3, 2, 4)), sample(*make_pair(2, 5, 1, tag=1))]
    batch = collate(samples, BatchLayout(PAD, seq_length=8))
    tokens, labels, mask = batch.tokens, batch.labels, batch.loss_mask
    assert batch.num_pairs == 2
    assert tokens.shape == labels.shape == mask.shape == batch.position_ids.shape == (4, 8)
    assert tokens.dtype == labels.dtype == batch.position_ids.dtype == torch.int64
    assert mask.dtype == torch.float32
    assert torch.equal(batch.position_ids, torch.arange(8).expand(4, 8))

    # Rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1.
    rows = [(s["prompt"], s[k]) for k in ("chosen", "rejected") for s in samples]
    for row, (prompt, response) in enumerate(rows):
        x = np.concatenate([prompt, response]).tolist()
        n = len(x)
        assert tokens[row].tolist() == x + [PAD] * (8 - n)
        assert labels[row].tolist() == x[1:] + [PAD] * (9 - n)  # pad where no next token
        assert mask[row].sum().item() == len(response)
        assert labels[row][mask[row].bool()].tolist() == response.tolist()
        assert mask[row, : len(prompt) - 1].sum() == 0 and mask[row, n - 1 :].sum() == 0


def test_collate_full_length_row_and_padding_choices():
    full = sample(*make_pair(3, 5, 2))  # prompt + chosen = seq_length exactly
    batch = collate([full], BatchLayout(PAD, seq_length=8))
    assert batch.tokens[0].tolist() == full["prompt"].tolist() + full["chosen"].tolist()
    assert batch.labels[0, -1] == PAD and batch.loss_mask[0].sum() == 5
    assert batch.loss_mask[0, -1] == 0

    short = [sample(*make_pair(2, 3, 1)), sample(*make_pair(3, 1, 2))]  # longest row: 5
    assert collate(short, BatchLayout(PAD, 64, pad_to_multiple_of=4)).tokens.shape == (4, 8)
    assert collate(short, BatchLayout(PAD, 64, pad_to_multiple_of=5)).tokens.shape == (4, 5)
    assert collate(short, BatchLayout(PAD, 64)).tokens.shape == (4, 64)
    # Rounding up never goes past seq_length.
    assert collate([full], BatchLayout(PAD, 8, pad_to_multiple_of=16)).tokens.shape == (2, 8)

    with pytest.raises(ValueError, match="seq_length"):
        collate([full], BatchLayout(PAD, seq_length=7))


def test_dataloader_pipeline(tmp_path):
    """Sampler + dataset + collate in a torch DataLoader, as the training loop uses them."""
    pairs = [make_pair(3 + t % 4, 2 + t % 3, 1 + t % 5, tag=t) for t in range(8)]
    ds = PreferencePairDataset(write_pairs(str(tmp_path / "d"), pairs), seq_length=12)
    sampler = PairBatchSampler(len(ds), 0, 2, 4, 0, 1, seed=3)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=partial(collate, layout=BatchLayout(PAD, seq_length=12))
    )
    indices, batches = iter(sampler), iter(loader)
    for _ in range(6):
        pair_ids, batch = next(indices), next(batches)
        assert batch.tokens.shape == (4, 12)
        # The second prompt token encodes the pair (tag * 1000 + 100); chosen rows come first.
        assert (batch.tokens[:2, 1] // 1000).tolist() == pair_ids
        assert (batch.tokens[2:, 1] // 1000).tolist() == pair_ids
        assert (batch.tokens[:2, 3:] // 100 % 10 == 3).sum() == 0  # no rejected in chosen rows
