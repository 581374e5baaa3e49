"""Preference pairs read from a Megatron indexed dataset and truncated to ``--seq-length``.

On disk: `PREFIX.bin/.idx` as written by megatron-core's `IndexedDatasetBuilder`,
one document per pair holding three sequences in order prompt, chosen, rejected, so pair i is
sequences 3i, 3i+1, 3i+2. The prompt starts with BOS and each response ends with EOS.
``simpo_megatron.data.batch.collate`` turns the pairs into micro-batches.
"""

import os
import struct
from collections.abc import Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset, get_bin_path, get_idx_path

from simpo_megatron.data.batch import PairSample


def check_prefix_exists(prefix: str) -> None:
    """Raise ValueError naming whichever of PREFIX.bin / PREFIX.idx is missing."""
    missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"dataset prefix {prefix!r}: missing {', '.join(missing)}")


def _open_indexed(prefix: str) -> IndexedDataset:
    """The indexed dataset of ``prefix``; ValueError naming the file for a damaged or truncated
    .idx, or a .bin shorter than its index says (which would otherwise fail deep in a step)."""
    idx, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    _check_index_file(idx)  # before IndexedDataset, which fails unclearly on a bad one
    indexed = IndexedDataset(prefix)
    index = indexed.index
    if index.sequence_count:
        needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
        size = os.path.getsize(bin_path)
        if size < needed:
            raise ValueError(
                f"{bin_path}: truncated ({size} bytes, its index {idx} needs {needed}); preprocess the data again"
            )
    return indexed


def _check_index_file(idx: str) -> None:
    """The header of a (non-multimodal) megatron .idx, and its size from the counts it holds:
    int32 lengths and int64 pointers per sequence, int64 document indices."""
    header_size = len(_INDEX_HEADER) + 8 + 1 + 8 + 8
    with open(idx, "rb") as fh:
        head = fh.read(header_size)
    problem = None
    if len(head) < header_size:
        problem = "shorter than its header"
    elif head[: len(_INDEX_HEADER)] != _INDEX_HEADER or struct.unpack("<Q", head[9:17])[0] != 1:
        problem = "not a megatron index (bad header or version)"
    else:
        sequences, documents = struct.unpack("<QQ", head[18:34])
        needed = header_size + sequences * (4 + 8) + documents * 8
        if os.path.getsize(idx) < needed:
            problem = f"truncated ({os.path.getsize(idx)} bytes, its header's counts need {needed})"
    if problem:
        raise ValueError(f"{idx}: damaged index, {problem}; preprocess the data again")


def _check_lengths(seq_length: int, max_prompt_length: int | None) -> None:
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2 (one prompt and one response token), got {seq_length}")
    if max_prompt_length is not None and not 1 <= max_prompt_length < seq_length:
        raise ValueError(
            f"max_prompt_length must be in [1, seq_length) so every response keeps a token, "
            f"got {max_prompt_length} with seq_length {seq_length}"
        )


def truncation_lengths(
    prompt_len: int,
    chosen_len: int,
    rejected_len: int,
    seq_length: int,
    max_prompt_length: int | None = None,
) -> tuple[int, int, int]:
    """Lengths (prompt, chosen, rejected) to keep so that prompt + either response fits.

    Nothing is cut when prompt + longer response <= seq_length. Otherwise:
    - with `max_prompt_length` (TRL's and the SimPO repository's rule), the prompt is cut to at
      most that many tokens, then the responses to the room left (seq_length - kept prompt);
      TRL cuts responses to seq_length - max_prompt_length even when the prompt is shorter,
      here a short prompt leaves its unused room to the responses;
    - without it, the prompt yields only as many tokens as needed, down to 1 token, then the
      responses are cut to the room left.
    Every part keeps at least one token: an empty response makes the length-averaged
    log-prob 0/0 (TRL #6548, SimPO #35).
    """
    _check_lengths(seq_length, max_prompt_length)
    if min(prompt_len, chosen_len, rejected_len) < 1:
        raise ValueError(
            f"prompt, chosen and rejected must be non-empty, got lengths {prompt_len}, {chosen_len}, {rejected_len}"
        )
    overflow = prompt_len + max(chosen_len, rejected_len) - seq_length
    if overflow <= 0:
        return prompt_len, chosen_len, rejected_len
    if max_prompt_length is None:
        kept_prompt = max(prompt_len - overflow, 1)
    else:
        kept_prompt = min(prompt_len, max_prompt_length)
    room = seq_length - kept_prompt
    return kept_prompt, min(chosen_len, room), min(rejected_len, room)


class PreferencePairDataset(torch.utils.data.Dataset):
    """The pairs of one indexed dataset (or a subset of them), truncated to `seq_length`.

    `indices` restricts the dataset to those pair indices, in that order (train/valid splits).
    Item i is {"prompt", "chosen", "rejected"}: numpy token arrays after truncation.
    A prompt cut from the left keeps its first token (the BOS) and the last tokens before the
    response: Llama-style models always see BOS at position 0, and TRL's keep-end would drop it.
    """

    def __init__(
        self,
        prefix: str,
        seq_length: int,
        max_prompt_length: int | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        _check_lengths(seq_length, max_prompt_length)
        check_prefix_exists(prefix)
        self.prefix = prefix
        self.seq_length = seq_length
        self.max_prompt_length = max_prompt_length
        self.indexed = _open_indexed(prefix)

        num_pairs = len(self.indexed.document_indices) - 1
        if not np.array_equal(self.indexed.document_indices, np.arange(0, 3 * num_pairs + 1, 3)):
            raise ValueError(f"{prefix}: every document must hold exactly 3 sequences (prompt, chosen, rejected)")
        lengths = self.indexed.sequence_lengths.reshape(num_pairs, 3)
        empty = np.flatnonzero(lengths.min(axis=1) == 0)
        if empty.size:
            raise ValueError(f"{prefix}: pair {int(empty[0])} has an empty prompt or response")

        if indices is None:
            self.indices = np.arange(num_pairs, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64)
            if self.indices.ndim != 1 or (
                self.indices.size and (self.indices.min() < 0 or self.indices.max() >= num_pairs)
            ):
                raise ValueError(f"indices must be a 1-D list of pair indices in [0, {num_pairs})")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> PairSample:
        first = 3 * int(self.indices[i])
        prompt, chosen, rejected = (self.indexed[first + k] for k in range(3))
        p, c, r = truncation_lengths(len(prompt), len(chosen), len(rejected), self.seq_length, self.max_prompt_length)
        if p < len(prompt):
            prompt = np.concatenate([prompt[:1], prompt[len(prompt) - p + 1 :]])
        return {"prompt": prompt, "chosen": chosen[:c], "rejected": rejected[:r]}
