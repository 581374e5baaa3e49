"""The C++ pair builder and its Python writer: megatron-core reads back exactly what was written."""

import json
import os
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from simpo_megatron._pair_builder import PairBuilder
from simpo_megatron.data.builder import (
    DTYPE_CODES,
    LAYOUT,
    PreferencePairWriter,
    merge_pair_datasets,
    optimal_dtype,
    read_sidecar,
)


def tokenizer_info(vocab_size: int, fingerprint: str = "f0") -> dict:
    return {
        "type": "TestTokenizer",
        "model": "none",
        "vocab_size": vocab_size,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 0,
        "fingerprint": fingerprint,
        "chat_template_sha256": None,
    }


def random_pairs(n: int, vocab_size: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, vocab_size, rng.integers(1, 20)) for _ in range(3)) for _ in range(n)]


def flat(pairs) -> tuple[np.ndarray, np.ndarray]:
    seqs = [s for pair in pairs for s in pair]
    offsets = np.cumsum([0] + [len(s) for s in seqs], dtype=np.int64)
    return np.concatenate(seqs).astype(np.int64), offsets


def write(prefix: str, pairs, vocab_size: int, fingerprint: str = "f0") -> dict:
    with PreferencePairWriter(prefix, tokenizer_info(vocab_size, fingerprint)) as writer:
        for start in range(0, len(pairs), 7):  # several batches
            writer.add_batch(*flat(pairs[start : start + 7]))
    return read_sidecar(prefix)


def assert_reads_back(prefix: str, pairs, dtype) -> None:
    ds = IndexedDataset(prefix)
    assert len(ds) == 3 * len(pairs)
    np.testing.assert_array_equal(ds.document_indices, np.arange(0, 3 * len(pairs) + 1, 3))
    for i, pair in enumerate(pairs):
        for j, seq in enumerate(pair):
            got = ds[3 * i + j]
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, seq)


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65499, np.uint16), (100_000, np.int32)])
def test_round_trip_through_megatron_reader(tmp_path, vocab_size, dtype):
    pairs = random_pairs(50, vocab_size, seed=vocab_size)
    pairs[0] = tuple(np.array([vocab_size - 1] * 3) for _ in range(3))  # the largest id survives
    meta = write(str(tmp_path / "d"), pairs, vocab_size)
    assert_reads_back(str(tmp_path / "d"), pairs, dtype)
    assert meta["dtype"] == np.dtype(dtype).name
    assert meta["num_pairs"] == 50 and meta["num_sequences"] == 150
    assert meta["num_tokens"] == sum(len(s) for p in pairs for s in p)


@pytest.mark.parametrize("vocab_size, code", [(1000, 8), (100_000, 4)])
def test_files_are_byte_identical_to_megatron_builder(tmp_path, vocab_size, code):
    pairs = random_pairs(30, vocab_size, seed=1)
    write(str(tmp_path / "ours"), pairs, vocab_size)
    dtype = np.uint16 if code == 8 else np.int32
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for pair in pairs:
        reference.add_document(np.concatenate(pair), [len(s) for s in pair])
    reference.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    header = (tmp_path / "ours.idx").read_bytes()[:34]
    assert header[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", header[9:]) == (1, code, 90, 31)


def test_add_pair_and_sequence_lengths(tmp_path):
    with PreferencePairWriter(str(tmp_path / "d"), tokenizer_info(100)) as writer:
        writer.add_pair([1, 5, 6], [7], [8, 9])
        writer.add_pair([1], [10, 11], [12])
        np.testing.assert_array_equal(writer.sequence_lengths(), [3, 1, 2, 1, 2, 1])
        assert writer.num_pairs == 2 and writer.num_tokens == 10
    assert_reads_back(str(tmp_path / "d"), [([1, 5, 6], [7], [8, 9]), ([1], [10, 11], [12])], np.uint16)


def test_merge(tmp_path):
    a, b = random_pairs(20, 500, seed=2), random_pairs(13, 500, seed=3)
    write(str(tmp_path / "a"), a, 500)
    write(str(tmp_path / "b"), b, 500)
    meta = merge_pair_datasets([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a")], str(tmp_path / "m"))
    assert_reads_back(str(tmp_path / "m"), a + b + a, np.uint16)
    assert meta["num_pairs"] == 53
    assert meta["merged_from"] == [str(tmp_path / p) for p in ("a", "b", "a")]
    assert meta["tokenizer"] == tokenizer_info(500)


def test_merge_refuses_other_tokenizer_dtype_or_layout(tmp_path):
    write(str(tmp_path / "a"), random_pairs(3, 500, seed=4), 500)
    write(str(tmp_path / "other"), random_pairs(3, 500, seed=5), 500, fingerprint="f1")
    with pytest.raises(ValueError, match="fingerprint"):
        merge_pair_datasets([str(tmp_path / "a"), str(tmp_path / "other")], str(tmp_path / "m"))
    assert not any(p.startswith("m.") for p in os.listdir(tmp_path))

    int32_builder = PairBuilder(str(tmp_path / "x.bin"), 4, 100_000)
    with pytest.raises(ValueError, match="tokens are uint16, this output is int32"):
        int32_builder.add_index(str(tmp_path / "a.idx"), str(tmp_path / "a.bin"))
    text = IndexedDatasetBuilder(str(tmp_path / "text.bin"), dtype=np.uint16)
    text.add_document(np.array([1, 2, 3, 4]), [2, 2])
    text.finalize(str(tmp_path / "text.idx"))
    uint16_builder = PairBuilder(str(tmp_path / "y.bin"), 8, 500)
    with pytest.raises(ValueError, match="not a preference-pair dataset"):
        uint16_builder.add_index(str(tmp_path / "text.idx"), str(tmp_path / "text.bin"))


def test_sidecar(tmp_path):
    meta = write(str(tmp_path / "d"), random_pairs(4, 300, seed=7), 300)
    on_disk = json.loads((tmp_path / "d.meta.json").read_text())
    assert on_disk == meta
    assert meta["format_version"] == 1 and meta["layout"] == LAYOUT == "prompt,chosen,rejected"
    assert meta["tokenizer"]["vocab_size"] == 300
    with pytest.raises(FileNotFoundError, match="nothere.meta.json"):
        read_sidecar(str(tmp_path / "nothere"))
    (tmp_path / "bad.meta.json").write_text('{"layout": "text"}')
    with pytest.raises(ValueError, match="not a preference-pair sidecar"):
        read_sidecar(str(tmp_path / "bad"))


def test_exception_publishes_nothing_and_keeps_previous_dataset(tmp_path):
    prefix = str(tmp_path / "d")
    good = random_pairs(5, 300, seed=8)
    write(prefix, good, 300)
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    with pytest.raises(RuntimeError, match="boom"):
        with PreferencePairWriter(prefix, tokenizer_info(300)) as writer:
            writer.add_batch(*flat(random_pairs(9, 300, seed=9)))
            assert any(".tmp-" in p for p in os.listdir(tmp_path))
            raise RuntimeError("boom")
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before
    assert_reads_back(prefix, good, np.uint16)


def test_invalid_batches_raise_and_write_nothing(tmp_path):
    prefix = str(tmp_path / "d")
    pair = ([1, 2], [3], [4])
    with PreferencePairWriter(prefix, tokenizer_info(10)) as writer:
        cases = [
            (np.array([1, 2, 3, 10]), [0, 2, 3, 4], "rejected holds token id 10, outside the vocabulary"),
            (np.array([1, 2, 3, -1]), [0, 2, 3, 4], "token id -1"),
            (np.array([1, 2, 3]), [0, 2, 3, 3], "rejected has 0 tokens"),
            (np.array([1, 2, 3]), [0, 2, 3], "3 \\* pairs \\+ 1"),
            (np.array([1, 2, 3]), [0, 1, 2, 4], "from 0 to len\\(tokens\\)"),
            (np.array([1.0, 2.0, 3.0]), [0, 1, 2, 3], "integer array"),
        ]
        for tokens, offsets, message in cases:
            with pytest.raises((ValueError, TypeError), match=message):
                writer.add_batch(tokens, np.array(offsets))
        writer.add_pair(*pair)
    assert_reads_back(prefix, [pair], np.uint16)


def test_token_dtypes_accepted(tmp_path):
    pairs = [(np.array([1, 2]), np.array([3]), np.array([4, 5]))]
    for dtype in (np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64):
        tokens, offsets = flat(pairs)
        prefix = str(tmp_path / np.dtype(dtype).name)
        with PreferencePairWriter(prefix, tokenizer_info(10)) as writer:
            writer.add_batch(tokens.astype(dtype), offsets)
            strided = np.repeat(tokens.astype(dtype), 2)[::2]
            writer.add_batch(strided, offsets.astype(np.int32))
        assert_reads_back(prefix, pairs * 2, np.uint16)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    prefix = str(tmp_path / "d")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f"d.bin.tmp-{host}-{int(dead.stdout)}"
    alive = tmp_path / f"d.idx.tmp-{host}-{os.getppid()}"
    other_host = tmp_path / f"d.bin.tmp-elsewhere-{int(dead.stdout)}"
    for path in (stale, alive, other_host):
        path.write_bytes(b"partial")
    write(prefix, random_pairs(2, 50, seed=10), 50)
    remaining = set(os.listdir(tmp_path))
    assert stale.name not in remaining
    assert {alive.name, other_host.name, "d.bin", "d.idx", "d.meta.json"} == remaining


def test_dtype_rules_equal_megatron():
    """The builder avoids importing megatron-core; its dtype choice and codes are megatron's."""
    for dtype, code in DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code
    for vocab_size in (1, 65499, 65500, 200_000):
        assert optimal_dtype(vocab_size) == DType.optimal_dtype(vocab_size)
