"""Reference-score files: round trip, atomic writes, damaged files, keys, fingerprints, datasets."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from safetensors.torch import save_file

from simpo_megatron.data import preprocess
from simpo_megatron.data.blended import build_pair_datasets
from simpo_megatron.data.pair_dataset import PreferencePairDataset, truncation_lengths
from simpo_megatron.data.reference_scores import (
    FIELDS,
    ReferenceKey,
    ReferenceScoresError,
    WithReferenceScores,
    data_fingerprint,
    describe_difference,
    find_reference_scores,
    read_reference_scores,
    reference_key,
    scores_path,
    stale_files,
    weights_fingerprint,
    write_reference_scores,
)
from simpo_megatron.data.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parents[2]

SP_MODEL = str(REPO / "examples" / "data" / "tokenizer.model")
KEY = ReferenceKey(
    data="sha256:" + "a" * 64,
    weights="hf, sha256:" + "b" * 64,
    seq_length=64,
    max_prompt_length=None,
    tokenizer="c" * 64,
    precision="fp32",
)
N = 37


def scores(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "chosen_logps": -rng.random(n) * 100,
        "rejected_logps": -rng.random(n) * 100,
        "chosen_tokens": rng.integers(1, 33, n),
        "rejected_tokens": rng.integers(1, 33, n),
    }


def write(path, key=KEY, **overrides):
    values = {**scores(), **overrides}
    write_reference_scores(str(path), key, *(values[f] for f in FIELDS))
    return str(path)


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory) -> dict[str, str]:
    """The example validation pairs (200) and the first 60 training pairs, preprocessed with the
    example SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("data")
    data = REPO / "examples" / "data"
    part = root / "part.jsonl"
    part.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:60]))
    out = {}
    for name, source in (("valid", data / "valid.jsonl"), ("part", part)):
        argv = [
            "--input",
            str(source),
            "--output-prefix",
            str(root / "o" / name),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            SP_MODEL,
        ]
        assert preprocess.main(argv) == 0
        out[name] = str(root / "o" / name)
    return out


# --- the file -----------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    path = scores_path(str(tmp_path), "/data/train_text", KEY)
    assert re.fullmatch(r".*/train_text\.[0-9a-f]{16}\.refscores", path)
    assert find_reference_scores(str(tmp_path), "/data/train_text", KEY) is None
    values = scores()
    write_reference_scores(path, KEY, *(values[f] for f in FIELDS))
    assert find_reference_scores(str(tmp_path), "/data/train_text", KEY) == path
    assert stale_files(str(tmp_path), "/data/train_text", KEY) == []

    table = read_reference_scores(path, KEY, num_pairs=N)
    assert len(table) == N and table.key == KEY
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(table, name), values[name])  # bit-exact
    row = table[5]
    assert row.dtype == np.float64 and row.shape == (4,)
    assert row.tolist() == [values[f][5] for f in FIELDS]


BAD_SCORES = [
    ("rejected_logps", np.zeros(N + 1), "rejected_logps has 38 values, chosen_logps 37"),
    ("rejected_logps", np.full(N, np.nan), r"rejected_logps\[0\] is nan"),
    ("chosen_tokens", np.zeros(N, dtype=np.int64), r"chosen_tokens\[0\] is 0"),
    ("rejected_tokens", np.full(N, 65), r"rejected_tokens\[0\] is 65: .*seq_length 64"),
    ("chosen_tokens", np.full(N, 3.0), "chosen_tokens must hold integers"),
    ("chosen_logps", np.zeros((N, 1)), "chosen_logps must be 1-D"),
]


@pytest.mark.parametrize("name, value, message", BAD_SCORES, ids=range(len(BAD_SCORES)))
def test_write_refuses_bad_scores(tmp_path, name, value, message):
    with pytest.raises(ValueError, match=message):
        write(tmp_path / "s.refscores", **{name: value})
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    """An exception after the payload is written but before the rename (the fsync fails):
    nothing new is published, the temporary file is gone, the old file still reads."""
    from simpo_megatron import fsutil

    path = write(tmp_path / "s.refscores")
    seen = []

    def failing_fsync(tmp):
        seen.append(os.path.getsize(tmp))
        raise OSError("disk full")

    monkeypatch.setattr(fsutil, "fsync_tree", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write(path, **scores(seed=1))
    assert seen and seen[0] == os.path.getsize(path)  # it failed with a whole file staged
    assert os.listdir(tmp_path) == ["s.refscores"]
    np.testing.assert_array_equal(read_reference_scores(path, KEY).chosen_logps, scores()["chosen_logps"])


def test_killed_writer_leaves_nothing_a_reader_accepts(tmp_path):
    """A writer killed (SIGKILL) before its rename leaves only its temporary file: no reader looks
    at it, and the next writer removes it."""
    code = f"""
import os, signal, numpy as np
from simpo_megatron import fsutil
from simpo_megatron.data.reference_scores import ReferenceKey, write_reference_scores
fsutil.publish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
key = ReferenceKey(**{dataclasses.asdict(KEY)!r})
path = {scores_path(str(tmp_path), "train", KEY)!r}
write_reference_scores(path, key, np.zeros(4), np.zeros(4), np.ones(4, int), np.ones(4, int))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9
    left = os.listdir(tmp_path)
    assert len(left) == 1 and ".refscores.tmp-" in left[0]
    assert find_reference_scores(str(tmp_path), "train", KEY) is None
    assert stale_files(str(tmp_path), "train", KEY) == []
    path = write(scores_path(str(tmp_path), "train", KEY))
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_truncated_file(tmp_path):
    path = write(tmp_path / "s.refscores")
    whole = Path(path).read_bytes()
    (header_length,) = struct.unpack("<Q", whole[8:16])
    for size in (0, 5, 12, 16 + header_length // 2, 16 + header_length + 100, len(whole) - 1):
        Path(path).write_bytes(whole[:size])
        with pytest.raises(ReferenceScoresError, match=rf"{re.escape(path)}: truncated"):
            read_reference_scores(path, KEY)
    Path(path).write_bytes(whole + b"\0")
    with pytest.raises(ReferenceScoresError, match="trailing bytes"):
        read_reference_scores(path, KEY)


def test_truncated_file_is_not_found_as_complete(tmp_path):
    path = write(scores_path(str(tmp_path), "train", KEY))
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 40)
    with pytest.raises(ReferenceScoresError, match="truncated"):
        find_reference_scores(str(tmp_path), "train", KEY)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ReferenceScoresError, match="missing"):
        read_reference_scores(str(tmp_path / "none.refscores"), KEY)
    (tmp_path / "x.refscores").write_bytes(b"PK\3\4" + bytes(100))
    with pytest.raises(ReferenceScoresError, match="not a reference-score file"):
        read_reference_scores(str(tmp_path / "x.refscores"), KEY)


@pytest.mark.parametrize("where", ["header", "payload", "checksum"])
def test_flipped_byte_fails_the_checksum(tmp_path, where):
    path = write(tmp_path / "s.refscores")
    data = bytearray(Path(path).read_bytes())
    position = {
        "header": data.index(b"cccc") + 2,  # inside the tokenizer fingerprint: still valid JSON
        "payload": len(data) - 32 - 8 * N,  # a byte of the first chosen token count
        "checksum": len(data) - 1,
    }[where]
    data[position] ^= 0x01
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ReferenceScoresError, match=rf"{re.escape(path)}: corrupted \(checksum mismatch\)"):
        read_reference_scores(path, KEY)


def rewrite_header(path: str, edit) -> None:
    """Edit the JSON header of a score file and seal it again with a valid checksum."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16 : 16 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-(16 + len(raw)) % 8)
    body = data[:8] + struct.pack("<Q", len(raw)) + raw + data[16 + length : -32]
    Path(path).write_bytes(body + hashlib.sha256(body).digest())


def test_other_format_version(tmp_path):
    path = write(scores_path(str(tmp_path), "train", KEY))
    rewrite_header(path, lambda h: h.update(format_version=2))
    with pytest.raises(ReferenceScoresError, match="written by reference-score format version 2, this version reads 1"):
        read_reference_scores(path, KEY)
    with pytest.raises(ReferenceScoresError, match="format version 2"):
        find_reference_scores(str(tmp_path), "train", KEY)
    other = dataclasses.replace(KEY, seq_length=128)
    [(stale, why)] = stale_files(str(tmp_path), "train", other)
    assert stale == path and "format version 2" in why


def test_pair_count_of_the_prefix(tmp_path):
    path = write(tmp_path / "s.refscores")
    with pytest.raises(ReferenceScoresError, match=rf"{re.escape(path)}: holds 37 pairs, its data prefix has 40"):
        read_reference_scores(path, KEY, num_pairs=40)


KEY_CHANGES = [
    (
        "data",
        "sha256:" + "d" * 64,
        r"data files \(\.bin/\.idx\) sha256:aaaaaaaaaaaa… \(stored\) vs sha256:dddddddddddd… \(this run\)",
    ),
    (
        "weights",
        "megatron iteration 100, sha256:" + "e" * 64,
        r"reference weights hf, sha256:bbbbbbbbbbbb… \(stored\) "
        r"vs megatron iteration 100, sha256:eeeeeeeeeeee… \(this run\)",
    ),
    ("seq_length", 4096, r"sequence length 64 \(stored\) vs 4096 \(this run\)"),
    ("max_prompt_length", 32, r"maximum prompt length none \(stored\) vs 32 \(this run\)"),
    ("tokenizer", "f" * 64, r"tokenizer cccccccccccc… \(stored\) vs ffffffffffff… \(this run\)"),
    ("precision", "bf16", r"scoring precision fp32 \(stored\) vs bf16 \(this run\)"),
    ("format_version", 2, r"file format version 1 \(stored\) vs 2 \(this run\)"),
]


@pytest.mark.parametrize("field, value, words", KEY_CHANGES, ids=[c[0] for c in KEY_CHANGES])
def test_key_mismatch_names_the_field(tmp_path, field, value, words):
    path = write(scores_path(str(tmp_path), "train", KEY))
    other = dataclasses.replace(KEY, **{field: value})
    expected = rf"{re.escape(path)}: the scores were computed for other settings: {words}"
    with pytest.raises(ReferenceScoresError, match=expected):
        read_reference_scores(path, other)
    message = describe_difference(KEY, other)
    assert re.fullmatch(words + ".*", message) and ";" not in message  # only that field
    # The other key names another file: nothing is found, and the stored one is listed as stale.
    assert find_reference_scores(str(tmp_path), "train", other) is None
    [(stale, why)] = stale_files(str(tmp_path), "train", other)
    assert stale == path and re.match(words, why)


def test_describe_difference_names_every_field():
    other = dataclasses.replace(KEY, **{field: value for field, value, _ in KEY_CHANGES})
    message = describe_difference(KEY, other)
    assert message.count(";") == len(KEY_CHANGES) - 1
    for _, _, words in KEY_CHANGES:
        assert re.search(words, message)
    assert describe_difference(KEY, dataclasses.replace(KEY)) == ""


def test_stale_files_keep_to_their_prefix(tmp_path):
    write(scores_path(str(tmp_path), "train", KEY))
    write(scores_path(str(tmp_path), "train.v2", KEY))  # another prefix whose name starts alike
    other = dataclasses.replace(KEY, precision="bf16")
    assert [os.path.basename(p) for p, _ in stale_files(str(tmp_path), "train", other)] == [
        os.path.basename(scores_path(str(tmp_path), "train", KEY))
    ]
    # A file of another prefix with the same basename says so (its provenance).
    path = scores_path(str(tmp_path), "/a/train", KEY)
    write_reference_scores(path, KEY, *(scores()[f] for f in FIELDS), provenance={"prefix": "/a/train"})
    [(_, why)] = stale_files(str(tmp_path), "/b/train", other)
    assert why.startswith("written for data prefix /a/train: scoring precision fp32 (stored) vs bf16")


def test_found_file_must_hold_its_key(tmp_path):
    """A file under this key's name whose header holds another key (an edited file) is refused."""
    path = write(scores_path(str(tmp_path), "train", KEY))
    rewrite_header(path, lambda h: h["key"].update(seq_length=128))
    with pytest.raises(ReferenceScoresError, match=r"key differs: sequence length 128 \(stored\) vs 64 \(this run\)"):
        find_reference_scores(str(tmp_path), "train", KEY)


def test_key_refuses_bad_fields():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        dataclasses.replace(KEY, precision="float32")
    with pytest.raises(ValueError, match="seq_length"):
        dataclasses.replace(KEY, seq_length=1)


# --- fingerprints -------------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_data_fingerprint_of_real_prefixes(prefixes, tmp_path):
    valid = prefixes["valid"]
    assert len(IndexedDataset(valid)) == 3 * 200  # megatron-core reads the prefix we fingerprint
    first = data_fingerprint(valid)
    assert first.startswith("sha256:") and data_fingerprint(valid) == first
    assert data_fingerprint(prefixes["part"]) != first
    for ext in (".bin", ".idx"):
        shutil.copy(valid + ext, tmp_path / f"copy{ext}")
    assert data_fingerprint(str(tmp_path / "copy")) == first  # content, not the path
    flip(tmp_path / "copy.bin", os.path.getsize(valid + ".bin") // 2)  # small .bin: read whole
    assert data_fingerprint(str(tmp_path / "copy")) != first


def test_data_fingerprint_samples_a_large_bin(tmp_path):
    mib = 1 << 20
    size = 5 * mib
    (tmp_path / "d.bin").write_bytes(np.random.default_rng(0).bytes(size))
    (tmp_path / "d.idx").write_bytes(b"index" * 100)
    prefix = str(tmp_path / "d")
    base = data_fingerprint(prefix)
    window = 100 * (size - 4096) // 255  # the start of the 101st evenly spaced block
    for offset in (10, size - 10, window + 7):
        flip(tmp_path / "d.bin", offset)
        assert data_fingerprint(prefix) != base, offset
        flip(tmp_path / "d.bin", offset)  # undo
    assert data_fingerprint(prefix) == base
    # The limit: one byte between sampled blocks, with the same .idx and size, is not seen.
    flip(tmp_path / "d.bin", window + 4096 + 100)
    assert data_fingerprint(prefix) == base
    flip(tmp_path / "d.bin", window + 4096 + 100)
    with open(tmp_path / "d.idx", "ab") as fh:
        fh.write(b"\0")
    assert data_fingerprint(prefix) != base
    with open(tmp_path / "d.bin", "ab") as fh:
        fh.write(b"\0")
    assert data_fingerprint(prefix) != base


BIG = 2 * 1024 * 1024  # elements of the 8 MiB tensor: its middle is outside the file's first and last MiB


def hf_dir(path: Path, big: torch.Tensor, config: dict | None = None) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"hidden_size": 8}))
    save_file({"a.weight": big, "b.weight": torch.arange(8, dtype=torch.float32)}, str(path / "model.safetensors"))
    return str(path)


def test_hf_weights_fingerprint(tmp_path):
    big = torch.randn(BIG, generator=torch.Generator().manual_seed(0))
    base = weights_fingerprint(hf_dir(tmp_path / "base", big))
    assert base.startswith("hf, sha256:")
    assert weights_fingerprint(hf_dir(tmp_path / "copy", big.clone())) == base

    def changed(name, tensor=big, config=None):
        return weights_fingerprint(hf_dir(tmp_path / name, tensor, config))

    middle = big.clone()
    middle[BIG // 2] += 1  # one element mid-tensor, same size: the tensor's middle block
    assert changed("middle", middle) != base
    trained = big + 1e-3 * torch.randn(BIG, generator=torch.Generator().manual_seed(1))  # a training step
    assert changed("trained", trained) != base
    assert changed("bf16", big.bfloat16()) != base  # another dtype: another header
    assert changed("config", big, {"hidden_size": 8, "rope_theta": 1e6}) != base
    # The limit: an element between the sampled blocks of a same-size tensor is not seen.
    unsampled = big.clone()
    unsampled[3 * BIG // 8] += 1
    assert changed("unsampled", unsampled) == base


SAVE_CHECKPOINTS = """
import os, sys
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from simpo_megatron.runtime import ParallelLayout, destroy_distributed, initialize_distributed

def save(root, iteration, weight):
    ckpt = os.path.join(root, f"iter_{iteration:07d}")
    os.makedirs(ckpt)
    bias = torch.ones(4)
    state = {"model": {"w": ShardedTensor.from_rank_offsets("decoder.weight", weight, replica_id=0),
                       "b": ShardedTensor.from_rank_offsets("decoder.bias", bias, replica_id=0)},
             "iteration": iteration}
    dist_checkpointing.save(state, ckpt)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write(str(iteration))

if __name__ == "__main__":
    initialize_distributed(ParallelLayout())
    big = torch.randn(BIG, generator=torch.Generator().manual_seed(0))
    middle = big.clone()
    middle[BIG // 2 - 512 : BIG // 2 + 512] += 1  # 4 KiB mid-tensor, same sizes everywhere
    trained = big + 1e-3 * torch.randn(BIG, generator=torch.Generator().manual_seed(1))  # a training step
    unsampled = big.clone()
    unsampled[3 * BIG // 8] += 1  # between the sampled blocks
    variants = {"base": (10, big), "again": (10, big.clone()), "later": (20, big), "middle": (10, middle),
                "trained": (10, trained), "unsampled": (10, unsampled)}
    for name, (iteration, weight) in variants.items():
        save(os.path.join(sys.argv[1], name), iteration, weight)
    destroy_distributed()
"""


def test_megatron_weights_fingerprint(tmp_path):
    """Checkpoints saved by megatron-core's dist_checkpointing (in a child process: its writer
    starts processes of its own)."""
    script = tmp_path / "save.py"
    script.write_text(f"BIG = {BIG}\n" + SAVE_CHECKPOINTS)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    root = str(tmp_path / "base")
    base = weights_fingerprint(root)
    assert base.startswith("megatron iteration 10, sha256:")
    files = set(os.listdir(os.path.join(root, "iter_0000010")))
    assert {".metadata", "common.pt", "metadata.json"} < files and any(f.endswith(".distcp") for f in files)
    assert weights_fingerprint(os.path.join(root, "iter_0000010")) == base  # the iteration directory itself
    shutil.copytree(root, tmp_path / "copy")
    assert weights_fingerprint(str(tmp_path / "copy")) == base
    # Saved again (its .metadata then holds another path and save id): the same weights.
    assert weights_fingerprint(str(tmp_path / "again")) == base
    for name in ("later", "middle", "trained"):
        assert weights_fingerprint(str(tmp_path / name)) != base, name
    # Unlike safetensors, each stored item ends with the CRC-32 of its bytes: an element between
    # the sampled blocks is seen too.
    assert weights_fingerprint(str(tmp_path / "unsampled")) != base


def test_weights_fingerprint_refuses_other_paths(tmp_path):
    with pytest.raises(ValueError, match="neither an HF model directory .* nor a Megatron checkpoint"):
        weights_fingerprint(str(tmp_path))


def test_reference_key_of_a_prefix(prefixes, tmp_path):
    weights = hf_dir(tmp_path / "hf", torch.zeros(16))
    key = reference_key(prefixes["valid"], weights, 512, 128, "bf16")
    assert key == ReferenceKey(
        data=data_fingerprint(prefixes["valid"]),
        weights=weights_fingerprint(weights),
        seq_length=512,
        max_prompt_length=128,
        tokenizer=build_tokenizer("SentencePieceTokenizer", SP_MODEL).fingerprint,
        precision="bf16",
    )


# --- samples with their scores ------------------------------------------------------------------


def raw_pairs(prefix: str) -> list[tuple[tuple[int, ...], ...]]:
    ds = IndexedDataset(prefix)
    return [tuple(tuple(ds[3 * i + k].tolist()) for k in range(3)) for i in range(len(ds) // 3)]


def table_for(prefix: str, tmp_path: Path, seq_length: int, max_prompt_length: int | None, tag: int):
    """Scores of PREFIX whose chosen log-prob names the pair: -(1000 * tag + pair index), and
    token counts of the pair truncated as the dataset truncates it."""
    pairs = raw_pairs(prefix)
    counts = np.array([truncation_lengths(*map(len, p), seq_length, max_prompt_length)[1:] for p in pairs])
    key = ReferenceKey(
        data=data_fingerprint(prefix),
        weights="hf, sha256:" + "b" * 64,
        seq_length=seq_length,
        max_prompt_length=max_prompt_length,
        tokenizer="c" * 64,
        precision="fp32",
    )
    path = scores_path(str(tmp_path), prefix, key)
    ids = -(1000.0 * tag + np.arange(len(pairs)))
    write_reference_scores(path, key, ids, ids - 0.5, counts[:, 0], counts[:, 1])
    return read_reference_scores(path, key, num_pairs=len(pairs))


def test_one_prefix_with_a_split_and_truncation(prefixes, tmp_path):
    prefix = prefixes["valid"]
    table = table_for(prefix, tmp_path, 24, 8, tag=0)
    dataset = PreferencePairDataset(prefix, 24, 8, indices=np.arange(150, 200))
    wrapped = WithReferenceScores(dataset, {prefix: table})
    assert len(wrapped) == 50
    truncated = 0
    for i in range(len(wrapped)):
        sample = wrapped[i]
        assert set(sample) == {"prompt", "chosen", "rejected", "reference"}
        for name in ("prompt", "chosen", "rejected"):
            np.testing.assert_array_equal(sample[name], dataset[i][name])
        pair = 150 + i
        assert sample["reference"].tolist() == [-pair, -pair - 0.5, len(sample["chosen"]), len(sample["rejected"])]
        truncated += len(sample["prompt"]) + max(len(sample["chosen"]), len(sample["rejected"])) == 24
    assert truncated > 0  # the truncation bound


def test_blend_of_two_prefixes(prefixes, tmp_path):
    """Each sample of a weighted blend (split 90/10) carries the scores of the pair it holds,
    found independently by its tokens."""
    names = ("valid", "part")
    tables = {prefixes[name]: table_for(prefixes[name], tmp_path, 512, None, tag) for tag, name in enumerate(names)}
    owners: dict[tuple, set[float]] = {}
    for tag, name in enumerate(names):
        for i, pair in enumerate(raw_pairs(prefixes[name])):
            owners.setdefault(pair, set()).add(-(1000.0 * tag + i))
    train, valid = build_pair_datasets(
        ["0.7", prefixes["valid"], "0.3", prefixes["part"]],
        "90,10,0",
        None,
        512,
        None,
        seed=3,
        train_samples=120,
        valid_samples=None,
    )
    for dataset in (train, valid):
        wrapped = WithReferenceScores(dataset, tables)
        seen_tags = set()
        for i in range(len(wrapped)):
            sample = wrapped[i]
            tokens = tuple(tuple(sample[k].tolist()) for k in ("prompt", "chosen", "rejected"))
            assert sample["reference"][0] in owners[tokens]
            seen_tags.add(int(-sample["reference"][0] // 1000))
        assert seen_tags == {0, 1}


def test_scores_that_do_not_fit_the_dataset(prefixes, tmp_path):
    valid, part = prefixes["valid"], prefixes["part"]
    table = table_for(valid, tmp_path, 24, 8, tag=0)
    with pytest.raises(ReferenceScoresError, match=f"no reference scores given for data prefix {re.escape(part)}"):
        WithReferenceScores(PreferencePairDataset(part, 24, 8), {valid: table})
    with pytest.raises(ReferenceScoresError, match=f"holds 200 pairs, {re.escape(part)} has 60"):
        WithReferenceScores(PreferencePairDataset(part, 24, 8), {part: table})
    mismatch = "scored with seq_length 24 and max_prompt_length 8, .* truncates to 512 and None"
    with pytest.raises(ReferenceScoresError, match=mismatch):
        WithReferenceScores(PreferencePairDataset(valid, 512), {valid: table})
    # Token counts that are not the pair's (scores in another pair order): refused per sample.
    wrong = dataclasses.replace(table, chosen_tokens=np.roll(table.chosen_tokens, 1))
    wrapped = WithReferenceScores(PreferencePairDataset(valid, 24, 8), {valid: wrong})
    with pytest.raises(ReferenceScoresError, match=r"pair \d+ has \d+ chosen and \d+ rejected tokens stored, the data"):
        for i in range(len(wrapped)):
            wrapped[i]
