"""The C++ pair builder against megatron-core's Python IndexedDatasetBuilder, on the same pairs.

Both write the same 100,000 pairs (one document of three sequences each) to .bin/.idx files
that are checked to be byte-identical. Cases:
- lengths "short" (4-32 tokens a sequence) or "long" (64-512);
- input "lists": each pair's three token lists, as a tokenizer returns them (megatron gets
  one add_document per pair; the C++ side flattens 512 pairs into arrays, as
  tools/preprocess_preference_data.py does, then calls add_batch);
  input "arrays": pairs already in numpy arrays (per pair for megatron, flat batches of 512
  pairs for the C++ builder).
Prints one JSON line per case with pairs/s of each and the ratio (best of --repeats).

    python tools/bench/bench_builder.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from simpo_megatron.data.builder import PreferencePairWriter  # noqa: E402

BATCH = 512
LENGTHS = {"short": (4, 32), "long": (64, 512)}


def make_pairs(n: int, lengths: tuple[int, int], vocab_size: int, seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lengths[0], lengths[1] + 1, size=(n, 3))
    tokens = rng.integers(0, vocab_size, size=int(sizes.sum()), dtype=np.int32)
    bounds = np.cumsum(sizes.ravel())[:-1]
    seqs = np.split(tokens, bounds)
    return [seqs[3 * i : 3 * i + 3] for i in range(n)]


def megatron_writer(prefix: str, documents: list, dtype: type) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for tokens, lengths in documents:
        builder.add_document(tokens, lengths)
    builder.finalize(prefix + ".idx")


def cpp_writer(prefix: str, batches: list, as_lists: bool, vocab_size: int) -> None:
    with PreferencePairWriter(prefix, {"vocab_size": vocab_size}) as writer:
        for batch in batches:
            if as_lists:
                tokens: list[int] = []
                offsets = [0]
                for pair in batch:
                    for seq in pair:
                        tokens.extend(seq)
                        offsets.append(len(tokens))
                writer.add_batch(np.array(tokens, dtype=np.int32), np.array(offsets, dtype=np.int64))
            else:
                writer.add_batch(*batch)


def best_time(repeats: int, fn: Callable[..., None], *args: Any) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = np.uint16 if args.vocab_size < 65500 else np.int32

    with tempfile.TemporaryDirectory() as tmp:
        for length_name, lengths in LENGTHS.items():
            pairs = make_pairs(args.pairs, lengths, args.vocab_size, seed=0)
            for input_name in ("lists", "arrays"):
                as_lists = input_name == "lists"
                if as_lists:
                    py_pairs = [[[int(t) for t in seq] for seq in pair] for pair in pairs]
                    meg_input = [(p[0] + p[1] + p[2], [len(s) for s in p]) for p in py_pairs]
                    cpp_input = [py_pairs[i : i + BATCH] for i in range(0, len(py_pairs), BATCH)]
                else:
                    meg_input = [(np.concatenate(p), [len(s) for s in p]) for p in pairs]
                    cpp_input = []
                    for i in range(0, len(pairs), BATCH):
                        seqs = [s for p in pairs[i : i + BATCH] for s in p]
                        offsets = np.cumsum([0] + [len(s) for s in seqs], dtype=np.int64)
                        cpp_input.append((np.concatenate(seqs), offsets))
                meg_prefix, cpp_prefix = os.path.join(tmp, "megatron"), os.path.join(tmp, "cpp")

                megatron_s = best_time(args.repeats, megatron_writer, meg_prefix, meg_input, dtype)
                cpp_s = best_time(args.repeats, cpp_writer, cpp_prefix, cpp_input, as_lists, args.vocab_size)
                for ext in ("bin", "idx"):
                    with open(f"{meg_prefix}.{ext}", "rb") as a, open(f"{cpp_prefix}.{ext}", "rb") as b:
                        assert a.read() == b.read(), f"outputs differ ({ext})"
                tokens = sum(len(s) for p in pairs for s in p)
                print(
                    json.dumps(
                        {
                            "bench": "builder",
                            "case": f"{length_name}/{input_name}",
                            "pairs": args.pairs,
                            "tokens": tokens,
                            "dtype": np.dtype(dtype).name,
                            "megatron_pairs_per_s": round(args.pairs / megatron_s),
                            "cpp_pairs_per_s": round(args.pairs / cpp_s),
                            "ratio": round(megatron_s / cpp_s, 1),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
