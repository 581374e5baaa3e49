"""End-to-end preprocessing throughput (pairs/s) with 1 and 2 worker processes.

Runs tools/preprocess_preference_data.py in this process (interpreter start-up excluded;
tokenizer loading, worker start-up, reading, tokenizing and writing included) on JSONL made
from the example data: "example" (its short pairs) and "long" (prompts of ~150 words and
responses of ~100 words). The outputs of 1 and 2 workers are checked to be identical.
Prints one JSON line per case.

    python tools/bench/bench_preprocess.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_preference_data as preprocess  # noqa: E402
from make_example_data import WORDS  # noqa: E402

TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer.model")


def example_pairs(n: int) -> list[str]:
    with open(os.path.join(REPO, "examples", "data", "train.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [lines[i % len(lines)] for i in range(n)]


def long_pairs(n: int) -> list[str]:
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    return [json.dumps({"prompt": text(150), "chosen": text(100), "rejected": text(100)}) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        for case, make in (("example", example_pairs), ("long", long_pairs)):
            path = os.path.join(tmp, f"{case}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(make(args.pairs)) + "\n")
            outputs = []
            for workers in (1, 2):
                prefix = os.path.join(tmp, f"{case}-{workers}")
                argv = ["--input", path, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                        "--tokenizer-model", TOKENIZER, "--workers", str(workers)]
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    assert preprocess.main(argv) == 0
                seconds = time.perf_counter() - start
                with open(prefix + ".bin", "rb") as f:
                    outputs.append(f.read())
                with open(prefix + ".meta.json", encoding="utf-8") as f:
                    tokens = json.load(f)["num_tokens"]
                print(json.dumps({
                    "bench": "preprocess",
                    "case": case,
                    "workers": workers,
                    "pairs": args.pairs,
                    "tokens": tokens,
                    "seconds": round(seconds, 2),
                    "pairs_per_s": round(args.pairs / seconds),
                    "tokens_per_s": round(tokens / seconds),
                }), flush=True)
            assert outputs[0] == outputs[1], "1 and 2 workers wrote different data"


if __name__ == "__main__":
    main()
