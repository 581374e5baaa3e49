"""parse_data_path, split parsing, BlendedPairDataset and build_pair_datasets."""

from collections import Counter

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from simpo_megatron.data import (
    BlendedPairDataset,
    PreferencePairDataset,
    build_pair_datasets,
    parse_data_path,
)
from simpo_megatron.data.blended import split_matrix

BOS, EOS = 1, 2


def write_tagged(prefix: str, num_pairs: int, tag: int) -> str:
    """num_pairs pairs whose prompts carry (tag, pair index): [BOS, 1000 * tag + i]."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for i in range(num_pairs):
        for sequence in ([BOS, 1000 * tag + i], [10, EOS], [11, 12, EOS]):
            builder.add_item(torch.tensor(sequence, dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def ids(dataset) -> list[tuple[int, int]]:
    """(tag, pair index) of every item."""
    return [divmod(int(item["prompt"][1]), 1000) for item in dataset]


def test_parse_data_path_forms(tmp_path):
    a, b = write_tagged(str(tmp_path / "a"), 3, 0), write_tagged(str(tmp_path / "b"), 3, 1)
    assert parse_data_path([a]) == ([a], None)
    assert parse_data_path([a, b]) == ([a, b], None)
    assert parse_data_path(["0.7", a, "0.3", b]) == ([a, b], [0.7, 0.3])
    assert parse_data_path(["3", a]) == ([a], [3.0])


def test_parse_data_path_errors(tmp_path):
    a = write_tagged(str(tmp_path / "a"), 3, 0)
    with pytest.raises(ValueError, match="empty"):
        parse_data_path([])
    with pytest.raises(ValueError, match="positive"):
        parse_data_path(["0", a])
    with pytest.raises(ValueError, match="positive"):
        parse_data_path(["-1", a, "2", a])
    with pytest.raises(ValueError, match=r"missing .*/nope\.bin, .*/nope\.idx"):
        parse_data_path([a, str(tmp_path / "nope")])
    (tmp_path / "half.bin").touch()
    with pytest.raises(ValueError, match=r"missing .*/half\.idx"):
        parse_data_path([str(tmp_path / "half")])
    with pytest.raises(ValueError, match="looks like a weight"):
        parse_data_path(["0.5", a, a])  # odd length: read as three prefixes


def test_split_matrix():
    assert split_matrix("98,2,0") == [(0, 0.98), (0.98, 1.0), None]
    assert split_matrix("1") == [(0, 1.0), None, None]
    for bad in ("", "98,-2", "a,b", "1,2,3,4", "0,0,0"):
        with pytest.raises(ValueError, match="split"):
            split_matrix(bad)


def letters(tag: str, n: int) -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def test_blend_realizes_weights_deterministically():
    datasets = [letters("a", 50), letters("b", 30), letters("c", 20)]
    blend = BlendedPairDataset(datasets, [0.5, 0.3, 0.2], size=1000, seed=3)
    items = [blend[i] for i in range(len(blend))]
    counts = Counter(item[0] for item in items)
    assert len(blend) == 1000
    assert abs(counts["a"] - 500) <= 1 and abs(counts["b"] - 300) <= 1
    assert abs(counts["c"] - 200) <= 1
    # Every prefix of the stream follows the weights too (Megatron's greedy interleaving).
    assert abs(Counter(item[0] for item in items[:100])["a"] - 50) <= 1
    # Oversampled datasets repeat in whole shuffled epochs: each item ~10 times.
    assert set(Counter(items).values()) <= {9, 10, 11}
    assert items == [blend[i] for i in range(1000)]
    again = BlendedPairDataset(datasets, [0.5, 0.3, 0.2], size=1000, seed=3)
    assert items == [again[i] for i in range(1000)]
    other = BlendedPairDataset(datasets, [0.5, 0.3, 0.2], size=1000, seed=4)
    assert items != [other[i] for i in range(1000)]
    assert [i[0] for i in items] == [other[i][0] for i in range(1000)]  # same interleaving


def test_blend_undersamples_without_repeats():
    blend = BlendedPairDataset([letters("a", 100), letters("b", 100)], [3, 1], size=40, seed=0)
    items = [blend[i] for i in range(40)]
    assert len(set(items)) == 40
    assert Counter(item[0] for item in items) == {"a": 30, "b": 10}
    assert {int(x[1:]) for x in items if x[0] == "a"} != set(range(30))  # a random subset


def test_blend_defaults_draw_by_size():
    datasets = [letters("a", 7), letters("b", 3)]
    exhaustive = BlendedPairDataset(datasets, None, None, seed=0)
    assert sorted(exhaustive[i] for i in range(len(exhaustive))) == sorted(sum(datasets, []))
    by_size = BlendedPairDataset(datasets, None, size=100, seed=0)
    assert Counter(by_size[i][0] for i in range(100)) == {"a": 70, "b": 30}
    weighted = BlendedPairDataset(datasets, [1, 1], None, seed=0)
    assert len(weighted) == 10 and Counter(weighted[i][0] for i in range(10)) == {"a": 5, "b": 5}


def test_blend_argument_errors():
    with pytest.raises(ValueError, match="datasets"):
        BlendedPairDataset([], None, None, seed=0)
    with pytest.raises(ValueError, match="at least one pair"):
        BlendedPairDataset([["a"], []], None, None, seed=0)
    with pytest.raises(ValueError, match="weights"):
        BlendedPairDataset([["a"], ["b"]], [1.0], 4, seed=0)
    with pytest.raises(ValueError, match="weights"):
        BlendedPairDataset([["a"], ["b"]], [1.0, 0.0], 4, seed=0)
    with pytest.raises(ValueError, match="size"):
        BlendedPairDataset([["a"], ["b"]], None, 0, seed=0)


def test_single_prefix_split_is_disjoint_and_contiguous(tmp_path):
    a = write_tagged(str(tmp_path / "a"), 50, 0)
    train, valid = build_pair_datasets([a], "90,10,0", None, 16, None, 1234, 1000, 10)
    assert isinstance(train, PreferencePairDataset) and isinstance(valid, PreferencePairDataset)
    assert ids(train) == [(0, i) for i in range(45)]
    assert ids(valid) == [(0, i) for i in range(45, 50)]

    train, valid = build_pair_datasets([a], "80,10,10", None, 16, None, 1234, None, None)
    assert len(train) == 40 and ids(valid) == [(0, i) for i in range(40, 45)]

    train, valid = build_pair_datasets([a], "100,0,0", None, 16, None, 1234, None, None)
    assert len(train) == 50 and valid is None


def test_weighted_blend_keeps_splits_apart(tmp_path):
    a, b = write_tagged(str(tmp_path / "a"), 40, 0), write_tagged(str(tmp_path / "b"), 20, 1)
    data_path = ["0.75", a, "0.25", b]
    train, valid = build_pair_datasets(data_path, "90,10,0", None, 16, None, 7, 400, 40)
    assert isinstance(train, BlendedPairDataset) and len(train) == 400 and len(valid) == 40
    train_ids, valid_ids = ids(train), ids(valid)
    assert Counter(tag for tag, _ in train_ids) == {0: 300, 1: 100}
    assert Counter(tag for tag, _ in valid_ids) == {0: 30, 1: 10}
    assert set(train_ids) == {(0, i) for i in range(36)} | {(1, i) for i in range(18)}
    assert set(valid_ids) == {(0, i) for i in range(36, 40)} | {(1, 18), (1, 19)}
    again, _ = build_pair_datasets(data_path, "90,10,0", None, 16, None, 7, 400, 40)
    assert ids(again) == train_ids


def test_unweighted_blend_holds_each_pair_once(tmp_path):
    a, b = write_tagged(str(tmp_path / "a"), 30, 0), write_tagged(str(tmp_path / "b"), 10, 1)
    train, valid = build_pair_datasets([a, b], "90,10,0", None, 16, None, 7, 10_000, None)
    assert sorted(ids(train)) == sorted([(0, i) for i in range(27)] + [(1, i) for i in range(9)])
    assert sorted(ids(valid)) == [(0, 27), (0, 28), (0, 29), (1, 9)]


def test_separate_valid_data_path(tmp_path):
    a, v = write_tagged(str(tmp_path / "a"), 20, 0), write_tagged(str(tmp_path / "v"), 5, 9)
    train, valid = build_pair_datasets([a], "98,2,0", [v], 16, 4, 7, None, None)
    assert ids(train) == [(0, i) for i in range(20)]  # the split does not apply
    assert ids(valid) == [(9, i) for i in range(5)]
    assert train.max_prompt_length == valid.max_prompt_length == 4


def test_build_errors(tmp_path):
    a = write_tagged(str(tmp_path / "a"), 10, 0)
    with pytest.raises(ValueError, match="no valid pairs of"):
        build_pair_datasets([a], "99,1,0", None, 16, None, 7, None, None)  # 1% of 10 rounds to 0
    with pytest.raises(ValueError, match="no training data"):
        build_pair_datasets([a], "0,1,0", None, 16, None, 7, None, None)


def test_weighted_validation_blend_reads_each_pair_once(tmp_path):
    """Without a valid_samples count (what training passes), a weighted blend's validation
    part holds every validation pair exactly once, so an evaluation over it scores each once."""
    a, b = write_tagged(str(tmp_path / "a"), 40, 0), write_tagged(str(tmp_path / "b"), 20, 1)
    train, valid = build_pair_datasets(["0.9", a, "0.1", b], "90,10,0", None, 16, None, 7, 400, None)
    assert sorted(ids(valid)) == sorted([(0, i) for i in range(36, 40)] + [(1, 18), (1, 19)])
    v = write_tagged(str(tmp_path / "v"), 7, 5)
    w = write_tagged(str(tmp_path / "w"), 3, 6)
    _, valid = build_pair_datasets([a], "98,2,0", ["0.2", v, "0.8", w], 16, None, 7, 400, None)
    assert sorted(ids(valid)) == sorted([(5, i) for i in range(7)] + [(6, i) for i in range(3)])
