"""Writes preference-pair datasets: PREFIX.bin/.idx in megatron-core's format, plus PREFIX.meta.json.

One document per pair, three sequences in order prompt, chosen, rejected, so megatron-core's
`IndexedDataset(PREFIX)` reads the result unchanged. The tokens go through the C++
extension `simpo_megatron._pair_builder` in batches. The sidecar PREFIX.meta.json records the
tokenizer, the layout, the dtype and the counts, so the trainer can check that its tokenizer
is the one that wrote the data.

Publishing is atomic per file and safe as a whole, with the project's one scheme
(`simpo_megatron.fsutil`): everything is written to temporary files beside the output
(`fsutil.temporary_path`: `PREFIX.bin.tmp-HOST-PID`, ...), made durable, and published
(`fsutil.publish`) only when the writer closes without error, the .idx last, after any previous
PREFIX.idx has been removed.
A reader therefore sees the old dataset, no dataset, or the complete new one, never a
partial one. Temporary files of a killed run (SIGKILL cannot be caught) are removed by the
next writer of the same prefix on the same host.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from simpo_megatron import fsutil
from simpo_megatron.data.tokenizers import same_tokenizer

try:
    from simpo_megatron import _pair_builder
except ImportError as e:  # the C++ extension is built at install
    raise ImportError(
        "simpo_megatron._pair_builder is not built: install the package (`pip install .`, or "
        "`pip install -e .` for a checkout you edit), or build it in place: `python setup.py build_ext --inplace`"
    ) from e

FORMAT_VERSION = 1
LAYOUT = "prompt,chosen,rejected"
_SEQUENCES_PER_PAIR = 3
# megatron-core's `DType` codes in the .idx header (indexed_dataset.py), kept here so that writing
# a dataset does not import megatron-core; tests/unit/test_builder.py pins them to megatron's.
DTYPE_CODES = {np.uint16: 8, np.int32: 4}


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype megatron-core's `DType.optimal_dtype` picks: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def sidecar_path(prefix: str) -> str:
    """PREFIX.meta.json."""
    return prefix + ".meta.json"


def read_sidecar(prefix: str) -> dict[str, Any]:
    """The metadata of the pair dataset at PREFIX; raises if it is missing or not ours."""
    path = sidecar_path(prefix)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: PREFIX.bin/.idx written by simpo-preprocess (tools/preprocess_preference_data.py) "
            f"come with it"
        ) from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or meta.get("layout") != LAYOUT:
        raise ValueError(f"{path} is not a preference-pair sidecar (layout {LAYOUT!r}, format_version)")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this version reads up to {FORMAT_VERSION}")
    return meta


class PreferencePairWriter:
    """Writes pairs of token ids to PREFIX.bin/.idx and PREFIX.meta.json.

    Use as a context manager: the files appear when the block exits normally; on an exception
    nothing is published and the temporary files are removed.

        with PreferencePairWriter(prefix, tokenizer.describe()) as writer:
            writer.add_batch(tokens, seq_offsets)

    `tokenizer_info` is a tokenizer's `describe()` (it must hold "vocab_size"); the token dtype
    follows from the vocabulary size as megatron-core chooses it (`optimal_dtype`). `metadata`
    adds fields to the sidecar; it can still be updated through `writer.metadata` until the
    writer closes.
    """

    def __init__(
        self,
        output_prefix: str,
        tokenizer_info: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_prefix = output_prefix
        self.tokenizer_info = dict(tokenizer_info)
        self.metadata: dict[str, Any] = dict(metadata or {})
        vocab_size = int(self.tokenizer_info["vocab_size"])
        self.dtype: type[np.number] = optimal_dtype(vocab_size)
        self._final = {
            "bin": get_bin_path(output_prefix),
            "meta": sidecar_path(output_prefix),
            "idx": get_idx_path(output_prefix),
        }
        for path in self._final.values():
            fsutil.remove_dead_temporaries(path)
        self._temp = {key: fsutil.temporary_path(path) for key, path in self._final.items()}
        self._builder = _pair_builder.PairBuilder(self._temp["bin"], DTYPE_CODES[self.dtype], vocab_size)
        self._closed = False

    def add_batch(self, tokens: np.ndarray, seq_offsets: np.ndarray) -> None:
        """Append len(seq_offsets) // 3 pairs from flat arrays.

        `tokens[seq_offsets[3*i]:seq_offsets[3*i+1]]` is pair i's prompt, the next two slices its
        chosen and rejected responses; seq_offsets runs from 0 to len(tokens). Every sequence
        must be non-empty and every id in [0, vocab_size). A batch that fails these checks
        raises ValueError and writes nothing.
        """
        self._builder.add_batch(tokens, seq_offsets)

    def add_pair(self, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> None:
        """Append one pair (slow path: prefer add_batch for many pairs)."""
        tokens = np.fromiter((*prompt, *chosen, *rejected), dtype=np.int64)
        offsets = np.cumsum([0, len(prompt), len(chosen), len(rejected)], dtype=np.int64)
        self._builder.add_batch(tokens, offsets)

    def add_dataset(self, prefix: str) -> None:
        """Append every pair of the pair dataset at PREFIX, whose tokenizer must match ours."""
        other = read_sidecar(prefix)["tokenizer"]
        key = same_tokenizer(other, self.tokenizer_info)
        if key is not None:
            raise ValueError(
                f"cannot merge {prefix}: its tokenizer {key} is {other.get(key)!r}, "
                f"the output's is {self.tokenizer_info.get(key)!r}"
            )
        self._builder.add_index(get_idx_path(prefix), get_bin_path(prefix))

    @property
    def num_pairs(self) -> int:
        return self._builder.num_pairs

    @property
    def num_tokens(self) -> int:
        return self._builder.num_tokens

    def sequence_lengths(self) -> np.ndarray:
        """int32 lengths of every sequence so far: prompt, chosen, rejected for each pair."""
        return self._builder.sequence_lengths()

    def close(self) -> dict[str, Any]:
        """Write the index and the sidecar and publish all three files; returns the sidecar."""
        if self._closed:
            raise RuntimeError(f"writer for {self.output_prefix} is already closed")
        try:
            self._builder.finalize(self._temp["idx"])  # fsyncs the .bin and the .idx
            meta = self._sidecar()
            with open(self._temp["meta"], "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            # Remove the old index first: a crash between the renames then leaves no dataset
            # rather than an old index over new tokens.
            fsutil.remove(self._final["idx"])
            for key in ("bin", "meta", "idx"):
                fsutil.publish(self._temp[key], self._final[key], durable=False)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return meta

    def abort(self) -> None:
        """Stop writing and remove the temporary files; publishes nothing."""
        self._builder.abort()
        for path in self._temp.values():
            fsutil.remove(path)
        self._closed = True

    def __enter__(self) -> PreferencePairWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def _sidecar(self) -> dict[str, Any]:
        meta = {
            "format_version": FORMAT_VERSION,
            "layout": LAYOUT,
            "dtype": np.dtype(self.dtype).name,
            "num_pairs": self.num_pairs,
            "num_sequences": self.num_pairs * _SEQUENCES_PER_PAIR,
            "num_tokens": self.num_tokens,
            "tokenizer": self.tokenizer_info,
        }
        clash = meta.keys() & self.metadata.keys()
        if clash:
            raise ValueError(f"metadata may not override sidecar fields {sorted(clash)}")
        return {**meta, **self.metadata}


def merge_pair_datasets(inputs: Sequence[str], output_prefix: str) -> dict[str, Any]:
    """Concatenate the pair datasets at `inputs` (prefixes) into OUTPUT_PREFIX; returns its sidecar.

    All inputs must have been written with the same tokenizer (their sidecars say so).
    """
    if not inputs:
        raise ValueError("merge_pair_datasets needs at least one input prefix")
    tokenizer_info = read_sidecar(inputs[0])["tokenizer"]
    metadata = {"merged_from": list(inputs)}
    with PreferencePairWriter(output_prefix, tokenizer_info, metadata) as writer:
        for prefix in inputs:
            writer.add_dataset(prefix)
    return read_sidecar(output_prefix)
