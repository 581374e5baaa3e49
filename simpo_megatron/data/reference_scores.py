"""Reference-model scores on disk: computed once per data prefix, reused by every step of a run.

Reference-based losses (DPO, IPO, ...) need, per pair, the reference model's summed log-prob
of the chosen and of the rejected response. They are computed offline and stored here, one
file per data prefix, indexed by the pair's index in that prefix, so a blend of prefixes
finds each pair's scores whatever its weights, split or seed.

A file is valid only for the `ReferenceKey` it was written with: everything that changes the
scores (data, reference weights, truncation, tokenizer, precision). A stale file is refused,
never reused: `find_reference_scores` returns only a file of the wanted key, and
`stale_files` lists the others with what differs, so the caller can say why it re-scores.

File ``DIRECTORY/<prefix basename>.<16 hex of the key's hash>.refscores``, little-endian:

    0        8 bytes   magic b"SMREFSC1"
    8        u64       H, the length of the JSON header (space-padded: the payload is 8-aligned)
    16       H bytes   {"format_version", "key", "num_pairs", "payload", "provenance"}
    16+H     4 x N x 8 chosen_logps <f8, rejected_logps <f8, chosen_tokens <i8, rejected_tokens <i8
    end-32   32 bytes  sha256 of every byte before it

Log-probs are float64: they are sums of up to seq_length fp32 token log-probs, which a scorer
may accumulate in float64; float32 storage would round them again (by up to 6e-5 on a sum of
-1000), while 8 more bytes per pair are nothing next to the data, and the loss reads float64.

Writing is one process's job (`write_reference_scores`); with several data-parallel ranks,
each scores a part of the pairs, rank 0 gathers the parts into full arrays in pair order and
writes, the others wait at a barrier. A write is atomic (`fsutil.staged`): a killed writer
leaves only a ``*.tmp-HOST-PID`` file, which no reader looks at.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
import torch

from simpo_megatron import fsutil
from simpo_megatron.checkpoint_format import CheckpointError, resolve_checkpoint
from simpo_megatron.data.blended import BlendedPairDataset
from simpo_megatron.data.builder import get_bin_path, get_idx_path, read_sidecar
from simpo_megatron.data.pair_dataset import PairSample, PreferencePairDataset

FORMAT_VERSION = 1
SUFFIX = ".refscores"
PRECISIONS = ("fp32", "bf16", "fp16")
FIELDS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")

_MAGIC = b"SMREFSC1"
_PREAMBLE = struct.Struct("<8sQ")
_CHECKSUM_BYTES = 32
_BYTES_PER_PAIR = 8 * len(FIELDS)
_MIB = 1 << 20
_WINDOW = 4096  # one sampled block
_BIN_WINDOWS = 256  # evenly spaced blocks sampled from a .bin beyond its first and last MiB
_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's table of a dist checkpoint's items


class ReferenceScoresError(ValueError):
    """A reference-score file that is missing, incomplete, corrupted or for other settings."""


@dataclasses.dataclass(frozen=True)
class ReferenceKey:
    """What the stored scores depend on; a file serves a run only if its key is equal.

    `data`, `weights` and `tokenizer` are fingerprints (`data_fingerprint`,
    `weights_fingerprint`, the tokenizer fingerprint of the prefix's sidecar); `precision` is
    the dtype the reference forward ran in.
    """

    data: str
    weights: str
    seq_length: int
    max_prompt_length: int | None
    tokenizer: str
    precision: str
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise ValueError(f"seq_length must be an integer >= 2, got {self.seq_length!r}")
        if self.max_prompt_length is not None and not isinstance(self.max_prompt_length, int):
            raise ValueError(f"max_prompt_length must be an integer or None, got {self.max_prompt_length!r}")
        for name in ("data", "weights", "tokenizer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty fingerprint string")

    def short_hash(self) -> str:
        """16 hex digits of the sha256 of the key: the file name's part."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_FIELD_WORDS = {
    "data": "data files (.bin/.idx)",
    "weights": "reference weights",
    "seq_length": "sequence length",
    "max_prompt_length": "maximum prompt length",
    "tokenizer": "tokenizer",
    "precision": "scoring precision",
    "format_version": "file format version",
}


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1…", str(value))  # a sha256, shortened


def describe_difference(stored: ReferenceKey, wanted: ReferenceKey) -> str:
    """Every field where the keys differ, in words: "sequence length 2048 (stored) vs 4096
    (this run); ..." ("" when they are equal)."""
    parts = []
    for field in dataclasses.fields(ReferenceKey):
        theirs, mine = getattr(stored, field.name), getattr(wanted, field.name)
        if theirs != mine:
            parts.append(f"{_FIELD_WORDS[field.name]} {_shown(theirs)} (stored) vs {_shown(mine)} (this run)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Fingerprints: cheap reads of the files, chosen so that real changes alter them.


def _update_range(h: hashlib._Hash, fh: BinaryIO, offset: int, length: int) -> None:
    fh.seek(offset)
    while length > 0:
        chunk = fh.read(min(length, 16 * _MIB))
        if not chunk:
            raise ReferenceScoresError(f"{fh.name}: shorter than expected while fingerprinting it")
        h.update(chunk)
        length -= len(chunk)


def _update_file_ends(h: hashlib._Hash, fh: BinaryIO, name: str, size: int) -> None:
    """The file's name and size, and its first and last MiB (the whole file up to 2 MiB)."""
    h.update(f"{name}\0{size}\0".encode())
    if size <= 2 * _MIB:
        _update_range(h, fh, 0, size)
    else:
        _update_range(h, fh, 0, _MIB)
        _update_range(h, fh, size - _MIB, _MIB)


def _update_item(h: hashlib._Hash, fh: BinaryIO, offset: int, length: int) -> None:
    """One stored tensor's bytes: its first, middle and last 4 KiB (all of it up to 12 KiB)."""
    h.update(f"{offset}\0{length}\0".encode())
    if length <= 3 * _WINDOW:
        _update_range(h, fh, offset, length)
        return
    for start in (offset, offset + (length - _WINDOW) // 2, offset + length - _WINDOW):
        _update_range(h, fh, start, _WINDOW)


def data_fingerprint(prefix: str) -> str:
    """Fingerprint of the pair dataset PREFIX.bin/.idx.

    Reads all of PREFIX.idx (every sequence's length and offset, 44 bytes per pair), the size
    of PREFIX.bin, its first and last MiB and 256 evenly spaced 4 KiB blocks: adding, removing
    or re-cutting pairs changes the .idx; re-tokenizing changes nearly every block of the .bin.
    Not seen: token edits that keep every length and fall outside the sampled blocks (for a
    .bin over 2 MiB). Reading the whole .bin (up to 100s of GB) is not affordable per run.
    """
    h = hashlib.sha256(b"simpo-megatron pair data\0")
    idx, bin_ = get_idx_path(prefix), get_bin_path(prefix)
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data prefix {prefix!r}: {path} is missing")
    with open(idx, "rb") as fh:
        h.update(hashlib.file_digest(fh, "sha256").digest())
    size = os.path.getsize(bin_)
    with open(bin_, "rb") as fh:
        _update_file_ends(h, fh, "bin", size)
        if size > 2 * _MIB:
            last = size - _WINDOW
            for k in range(_BIN_WINDOWS):
                _update_range(h, fh, k * last // (_BIN_WINDOWS - 1), _WINDOW)
    return "sha256:" + h.hexdigest()


def _safetensors_tensors(fh: BinaryIO, size: int) -> tuple[bytes, list[tuple[int, int]]]:
    """A safetensors file's raw header and each tensor's (offset, length) in the file."""
    fh.seek(0)
    head = fh.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
    if 8 + length > size:
        raise ValueError(f"{fh.name}: not a safetensors file (header of {length} bytes, file of {size})")
    raw = fh.read(length)
    header = json.loads(raw)
    items = [
        (8 + length + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in sorted(header.items())
        if k != "__metadata__"
    ]
    return raw, items


def _hf_fingerprint(model_dir: str) -> str:
    from simpo_megatron.hf.files import SAFETENSORS_INDEX, safetensors_files

    files = safetensors_files(model_dir)
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors weights (convert .bin weights to safetensors first)")
    h = hashlib.sha256(b"simpo-megatron hf weights\0")
    for name in ("config.json", SAFETENSORS_INDEX):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                h.update(f"{name}\0".encode() + hashlib.file_digest(fh, "sha256").digest())
    for path in files:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            _update_file_ends(h, fh, os.path.basename(path), size)
            header, items = _safetensors_tensors(fh, size)
            h.update(header)
            for offset, length in items:
                _update_item(h, fh, offset, length)
    return "hf, sha256:" + h.hexdigest()


def _tensor_table(state_dict_metadata: Mapping[str, Any]) -> list[tuple]:
    """(name, dtype, shape, chunks) of each tensor a dist checkpoint holds; (name,) for objects."""
    table = []
    for name, meta in state_dict_metadata.items():
        if hasattr(meta, "chunks"):
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)
            table.append((name, str(meta.properties.dtype), tuple(meta.size), chunks))
        else:
            table.append((name,))
    return table


def _megatron_fingerprint(ckpt: str) -> str:
    from torch.distributed.checkpoint import FileSystemReader

    name = os.path.basename(os.path.normpath(ckpt))
    match = re.fullmatch(r"iter_(\d+)", name)
    iteration = int(match.group(1)) if match else None
    h = hashlib.sha256(f"simpo-megatron dist checkpoint\0{iteration}\0".encode())
    items: dict[str, list[tuple[int, int]]] = {}
    if os.path.isfile(os.path.join(ckpt, _DCP_METADATA)):
        # What it records, not its bytes: they also hold the save's path and a random save id.
        metadata = FileSystemReader(ckpt).read_metadata()
        h.update(repr(sorted(_tensor_table(metadata.state_dict_metadata))).encode())
        storage = sorted(
            (k.fqn, None if k.offset is None else tuple(k.offset), k.index, v.relative_path, v.offset, v.length)
            for k, v in metadata.storage_data.items()
        )
        h.update(repr(storage).encode())
        for *_, rel, offset, length in storage:
            items.setdefault(rel, []).append((offset, length))
    paths = sorted(
        os.path.relpath(os.path.join(root, f), ckpt)
        for root, _, fs in os.walk(ckpt)
        for f in fs
        if not (root == ckpt and f == _DCP_METADATA)
    )
    for rel in paths:
        size = os.path.getsize(os.path.join(ckpt, rel))
        with open(os.path.join(ckpt, rel), "rb") as fh:
            _update_file_ends(h, fh, rel, size)
            for offset, length in sorted(items.get(rel, [])):
                _update_item(h, fh, offset, length)
    where = f"iteration {iteration}" if iteration is not None else name
    return f"megatron {where}, sha256:" + h.hexdigest()


def weights_fingerprint(path: str) -> str:
    """Fingerprint of reference weights: an HF model directory (config.json + *.safetensors) or
    a Megatron checkpoint (a SAVE root with its tracker file, or one iter_XXXXXXX directory).

    Reads the small files whole (config.json, the safetensors index; a dist checkpoint's
    metadata.json and common.pt), and of every weight file its name, size, first and last MiB,
    its table of tensors (the safetensors header; the names, dtypes, shapes and places that
    the dist checkpoint's .metadata records) and the first, middle and last 4 KiB of every
    stored tensor (every item of a dist checkpoint, optimizer state included). A training step
    changes nearly every element of every tensor, a re-save another dtype or layout: both are
    seen. A dist checkpoint stores each item as a torch.save zip whose last 4 KiB hold the
    CRC-32 of all its bytes, so there any edit of a tensor is seen (but with odds 2^-32).
    Not seen in safetensors: an edit confined to unsampled bytes of tensors that keeps every
    size (a few hand-edited elements; embedding rows of tokens that were never trained). The
    paths are not part of it: a moved or copied checkpoint keeps its scores. The HF and the
    Megatron copies of one model differ.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        return _hf_fingerprint(path)
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as error:
        raise ValueError(
            f"reference weights {path!r}: neither an HF model directory (config.json and "
            f"*.safetensors) nor a Megatron checkpoint ({error})"
        ) from None
    return _megatron_fingerprint(ckpt)


def reference_key(
    prefix: str, weights: str, seq_length: int, max_prompt_length: int | None, precision: str
) -> ReferenceKey:
    """The key of scoring the pairs of PREFIX with the reference weights at `weights`."""
    return ReferenceKey(
        data=data_fingerprint(prefix),
        weights=weights_fingerprint(weights),
        seq_length=seq_length,
        max_prompt_length=max_prompt_length,
        tokenizer=read_sidecar(prefix)["tokenizer"]["fingerprint"],
        precision=precision,
    )


# ---------------------------------------------------------------------------------------------
# The file.


def default_directory(prefix: str) -> str:
    """Where scores go unless the caller chooses: beside the data prefix."""
    return os.path.dirname(os.path.abspath(prefix))


def scores_path(directory: str, prefix: str, key: ReferenceKey) -> str:
    """DIRECTORY/<prefix basename>.<key.short_hash()>.refscores."""
    return os.path.join(directory, f"{os.path.basename(prefix)}.{key.short_hash()}{SUFFIX}")


def _as_column(name: str, values: Any, integer: bool) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per pair), got shape {array.shape}")
    if integer:
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
        return array.astype("<i8")
    array = array.astype("<f8")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] is {array[bad[0]]}: every log-prob must be finite")
    return array


def write_reference_scores(
    path: str,
    key: ReferenceKey,
    chosen_logps: Any,
    rejected_logps: Any,
    chosen_tokens: Any,
    rejected_tokens: Any,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write the scores of every pair of one prefix (arrays in pair order) to `path`, atomically.

    One process writes (see the module docstring for several ranks). `provenance` (JSON, e.g.
    {"prefix": ..., "weights": ...}) is kept in the header for people and not part of the key;
    `stale_files` names its "prefix" when that is another prefix of the same basename.
    """
    columns = [
        _as_column(name, values, integer=name.endswith("tokens"))
        for name, values in zip(FIELDS, (chosen_logps, rejected_logps, chosen_tokens, rejected_tokens))
    ]
    num_pairs = len(columns[0])
    for name, column in zip(FIELDS, columns):
        if len(column) != num_pairs:
            raise ValueError(f"{name} has {len(column)} values, chosen_logps {num_pairs}: one per pair each")
    for name, column in zip(FIELDS[2:], columns[2:]):
        bad = np.flatnonzero((column < 1) | (column > key.seq_length))
        if bad.size:
            raise ValueError(
                f"{name}[{int(bad[0])}] is {column[bad[0]]}: response token counts are in "
                f"[1, seq_length {key.seq_length}]"
            )
    header = {
        "format_version": FORMAT_VERSION,
        "key": dataclasses.asdict(key),
        "num_pairs": num_pairs,
        "payload": [f"{name}:{column.dtype.str}" for name, column in zip(FIELDS, columns)],
        "provenance": dict(provenance or {}),
    }
    raw = json.dumps(header, indent=1).encode()
    raw += b" " * (-(_PREAMBLE.size + len(raw)) % 8)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fsutil.remove_dead_temporaries(path)
    digest = hashlib.sha256()
    with fsutil.staged(path) as tmp, open(tmp, "wb") as fh:
        for chunk in (_PREAMBLE.pack(_MAGIC, len(raw)), raw, *(c.tobytes() for c in columns)):
            fh.write(chunk)
            digest.update(chunk)
        fh.write(digest.digest())


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    """The header of `path` and the payload's offset, after checking that the file is one of
    ours, of this format version, and of the size its header implies (not the checksum)."""
    if not os.path.isfile(path):
        raise ReferenceScoresError(f"{path}: reference scores are missing (no such file)")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        preamble = fh.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size:
            kind = "truncated" if _MAGIC.startswith(preamble[: len(_MAGIC)]) else "not a reference-score file"
            raise ReferenceScoresError(f"{path}: {kind} ({size} bytes)")
        magic, length = _PREAMBLE.unpack(preamble)
        if magic != _MAGIC:
            raise ReferenceScoresError(f"{path}: not a reference-score file (magic {magic!r})")
        if _PREAMBLE.size + length + _CHECKSUM_BYTES > size:
            raise ReferenceScoresError(
                f"{path}: truncated or corrupted: its header of {length} bytes does not fit in {size} bytes"
            )
        try:
            header = json.loads(fh.read(length))
            version = header["format_version"]
        except (ValueError, KeyError, TypeError):
            raise ReferenceScoresError(f"{path}: corrupted (its header is not readable)") from None
    if version != FORMAT_VERSION:
        raise ReferenceScoresError(
            f"{path}: written by reference-score format version {version}, this version reads "
            f"{FORMAT_VERSION}: compute the scores again"
        )
    num_pairs = header.get("num_pairs")
    if not isinstance(num_pairs, int) or num_pairs < 0:
        raise ReferenceScoresError(f"{path}: corrupted (pair count {num_pairs!r})")
    offset = _PREAMBLE.size + length
    expected = offset + num_pairs * _BYTES_PER_PAIR + _CHECKSUM_BYTES
    if size != expected:
        kind = "truncated" if size < expected else "corrupted (trailing bytes)"
        raise ReferenceScoresError(f"{path}: {kind}: {size} bytes, a complete file of {num_pairs} pairs has {expected}")
    return header, offset


def _stored_key(path: str, header: dict[str, Any]) -> ReferenceKey:
    try:
        return ReferenceKey(**header["key"])
    except (KeyError, TypeError, ValueError) as error:
        raise ReferenceScoresError(f"{path}: corrupted (its key is not readable: {error})") from None


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceScoresTable:
    """The stored scores of one prefix; item i is pair i's
    [chosen_logps, rejected_logps, chosen_tokens, rejected_tokens] as float64."""

    path: str
    key: ReferenceKey
    chosen_logps: np.ndarray
    rejected_logps: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen_logps)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(
            [self.chosen_logps[i], self.rejected_logps[i], self.chosen_tokens[i], self.rejected_tokens[i]],
            dtype=np.float64,
        )


def read_reference_scores(path: str, key: ReferenceKey, num_pairs: int | None = None) -> ReferenceScoresTable:
    """The scores stored at `path`, which must be complete, intact and of `key` (and hold
    `num_pairs` pairs when given: the prefix's count); raises ReferenceScoresError otherwise."""
    header, offset = _read_header(path)
    n = header["num_pairs"]
    with open(path, "rb") as fh:
        body = fh.read(offset + n * _BYTES_PER_PAIR)
        checksum = fh.read(_CHECKSUM_BYTES)
    if hashlib.sha256(body).digest() != checksum:
        raise ReferenceScoresError(f"{path}: corrupted (checksum mismatch): compute the scores again")
    stored = _stored_key(path, header)
    if stored != key:
        raise ReferenceScoresError(
            f"{path}: the scores were computed for other settings: {describe_difference(stored, key)}"
        )
    if num_pairs is not None and n != num_pairs:
        raise ReferenceScoresError(f"{path}: holds {n} pairs, its data prefix has {num_pairs}")
    columns = [
        np.frombuffer(body, dtype="<f8" if name.endswith("logps") else "<i8", count=n, offset=offset + k * 8 * n)
        for k, name in enumerate(FIELDS)
    ]
    return ReferenceScoresTable(path, stored, *columns)


def find_reference_scores(directory: str, prefix: str, key: ReferenceKey) -> str | None:
    """The path of the complete scores of `key` for PREFIX under `directory`, None if there are
    none. A file of that name that is truncated or of another key raises; its checksum is checked
    when it is read."""
    path = scores_path(directory, prefix, key)
    if not os.path.exists(path):
        return None
    header, _ = _read_header(path)
    stored = _stored_key(path, header)
    if stored != key:
        raise ReferenceScoresError(
            f"{path}: its name is of this run's settings but its key differs: {describe_difference(stored, key)}"
        )
    return path


def stale_files(directory: str, prefix: str, key: ReferenceKey) -> list[tuple[str, str]]:
    """(path, why it does not serve this run) for every other score file of PREFIX's basename
    under `directory`."""
    name = re.escape(os.path.basename(prefix)) + r"\.[0-9a-f]{16}" + re.escape(SUFFIX)
    wanted = scores_path(directory, prefix, key)
    found = []
    pattern = os.path.join(glob.escape(directory), glob.escape(os.path.basename(prefix)) + ".*" + SUFFIX)
    for path in sorted(glob.glob(pattern)):
        if not re.fullmatch(name, os.path.basename(path)) or os.path.abspath(path) == os.path.abspath(wanted):
            continue
        try:
            header, _ = _read_header(path)
            why = describe_difference(_stored_key(path, header), key)
            provenance = header.get("provenance")
            where = provenance.get("prefix") if isinstance(provenance, dict) else None
            if where and os.path.abspath(where) != os.path.abspath(prefix):
                why = f"written for data prefix {where}: {why}"
        except ReferenceScoresError as error:
            why = str(error).removeprefix(f"{path}: ")
        found.append((path, why))
    return found


# ---------------------------------------------------------------------------------------------
# Samples with their scores.


def pair_datasets(dataset: torch.utils.data.Dataset) -> list[PreferencePairDataset]:
    """The PreferencePairDatasets a dataset draws from (itself, or a blend's parts)."""
    if isinstance(dataset, PreferencePairDataset):
        return [dataset]
    if isinstance(dataset, BlendedPairDataset):
        return [part for d in dataset.datasets for part in pair_datasets(d)]
    raise TypeError(f"reference scores need PreferencePairDataset or BlendedPairDataset, got {type(dataset).__name__}")


def _locate(dataset: torch.utils.data.Dataset, i: int) -> tuple[PreferencePairDataset, int]:
    """The PreferencePairDataset sample `i` comes from and its index there."""
    while isinstance(dataset, BlendedPairDataset):
        dataset, i = dataset.datasets[dataset.dataset_index[i]], dataset.sample_index[i]
    return dataset, int(i)


class WithReferenceScores(torch.utils.data.Dataset):
    """`dataset`'s samples with a "reference" entry: the [4] float64 scores of the pair
    (chosen_logps, rejected_logps, chosen_tokens, rejected_tokens).

    `dataset` is a PreferencePairDataset or a BlendedPairDataset of them; `tables` maps each of
    their prefixes to its scores. Each sample's response lengths are checked against the
    stored token counts, which catches scores of another truncation or another pair order.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, tables: Mapping[str, ReferenceScoresTable]) -> None:
        self.dataset = dataset
        self.tables = {os.path.abspath(prefix): table for prefix, table in tables.items()}
        for part in pair_datasets(dataset):
            table = self.tables.get(os.path.abspath(part.prefix))
            if table is None:
                raise ReferenceScoresError(f"no reference scores given for data prefix {part.prefix}")
            num_pairs = len(part.indexed.document_indices) - 1
            if len(table) != num_pairs:
                raise ReferenceScoresError(f"{table.path}: holds {len(table)} pairs, {part.prefix} has {num_pairs}")
            lengths = (table.key.seq_length, table.key.max_prompt_length)
            if lengths != (part.seq_length, part.max_prompt_length):
                raise ReferenceScoresError(
                    f"{table.path}: scored with seq_length {lengths[0]} and max_prompt_length "
                    f"{lengths[1]}, the dataset of {part.prefix} truncates to {part.seq_length} and "
                    f"{part.max_prompt_length}"
                )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> PairSample:
        part, j = _locate(self.dataset, i)
        sample = part[j]
        pair = int(part.indices[j])
        table = self.tables[os.path.abspath(part.prefix)]
        reference = table[pair]
        if (reference[2], reference[3]) != (len(sample["chosen"]), len(sample["rejected"])):
            raise ReferenceScoresError(
                f"{table.path}: pair {pair} has {int(reference[2])} chosen and {int(reference[3])} "
                f"rejected tokens stored, the data {len(sample['chosen'])} and {len(sample['rejected'])}"
            )
        return {**sample, "reference": reference}
