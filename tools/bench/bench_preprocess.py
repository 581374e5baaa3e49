"""Preprocessing throughput as whole processes, against SentencePiece alone.

For each case, runs as separate processes, in turn (A B C A B C ...):
- the baseline: SentencePiece alone encoding the same texts (prompt, chosen, rejected of every
  pair, read from the same JSONL) in one thread (`--sentencepiece-baseline`, this file);
- tools/preprocess_preference_data.py with --workers 1 and --workers 2 (start-up, reading,
  tokenizing prompt + response together, splitting and writing included).
`ratio_vs_sentencepiece` is the median over rounds of baseline seconds / tool seconds (>1: the
tool is faster than the baseline), each round's pair run back to back; CPU seconds (all threads
and processes) say how much work each did, which a shared machine distorts less than wall time,
and `cpu_ratio_vs_sentencepiece` is the same median of baseline / tool CPU seconds (what the
wall-time ratio would be without any parallelism). Cases: "example" (--pairs of the
example data's short pairs, cycled) and "long" (--pairs / 10 pairs with prompts of 150 words and
responses of 100). Also times `--help` (start-up). The outputs of 1 and 2 workers are checked
to be identical. Prints one JSON line per case.

    python tools/bench/bench_preprocess.py --pairs 150000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
from make_example_data import WORDS  # noqa: E402

TOOL = os.path.join(REPO, "tools", "preprocess_preference_data.py")
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer.model")


def example_pairs(n: int) -> list[str]:
    with open(os.path.join(REPO, "examples", "data", "train.jsonl"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [lines[i % len(lines)] for i in range(n)]


def long_pairs(n: int) -> list[str]:
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    return [json.dumps({"prompt": text(150), "chosen": " " + text(100), "rejected": " " + text(100)}) for _ in range(n)]


def sentencepiece_baseline(path: str) -> None:
    """Read the pairs and encode their three texts with SentencePiece in one thread."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)
    texts = []
    with open(path, "rb") as f:
        for line in f:
            record = json.loads(line)
            texts += (record["prompt"], record["chosen"], record["rejected"])
    print(sum(map(len, sp.encode(texts, num_threads=1))))


def seconds(command: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + sys, all threads and child processes) seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=150_000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each command, interleaved")
    parser.add_argument("--cases", nargs="+", default=["example", "long"], choices=["example", "long"])
    parser.add_argument("--sentencepiece-baseline", metavar="JSONL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sentencepiece_baseline:
        sentencepiece_baseline(args.sentencepiece_baseline)
        return

    help_times = [seconds([sys.executable, TOOL, "--help"])[0] for _ in range(args.rounds)]
    print(
        json.dumps(
            {
                "bench": "preprocess",
                "case": "startup",
                "command": "--help",
                "seconds": round(statistics.median(help_times), 3),
            }
        ),
        flush=True,
    )
    makers = {"example": example_pairs, "long": lambda n: long_pairs(max(1, n // 10))}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            path = os.path.join(tmp, f"{case}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(makers[case](args.pairs)) + "\n")
            baseline = [sys.executable, os.path.abspath(__file__), "--sentencepiece-baseline", path]
            tools = {
                workers: [
                    sys.executable,
                    TOOL,
                    "--input",
                    path,
                    "--output-prefix",
                    os.path.join(tmp, f"{case}-{workers}"),
                    "--tokenizer-type",
                    "SentencePieceTokenizer",
                    "--tokenizer-model",
                    TOKENIZER,
                    "--workers",
                    str(workers),
                ]
                for workers in (1, 2)
            }
            times: dict[object, list[tuple[float, float]]] = {"baseline": [], 1: [], 2: []}
            for _ in range(args.rounds):
                times["baseline"].append(seconds(baseline))
                for workers, command in tools.items():
                    times[workers].append(seconds(command))
            outputs = []
            for workers in tools:
                prefix = os.path.join(tmp, f"{case}-{workers}")
                with open(prefix + ".bin", "rb") as f:
                    outputs.append(f.read())
                with open(prefix + ".meta.json", encoding="utf-8") as f:
                    meta = json.load(f)
                tool_s = statistics.median(wall for wall, _ in times[workers])
                base_s = statistics.median(wall for wall, _ in times["baseline"])
                print(
                    json.dumps(
                        {
                            "bench": "preprocess",
                            "case": case,
                            "workers": workers,
                            "pairs": meta["num_pairs"],
                            "tokens": meta["num_tokens"],
                            "boundary_merges": meta["boundary_merges"]["responses"],
                            "seconds": round(tool_s, 2),
                            "pairs_per_s": round(meta["num_pairs"] / tool_s),
                            "cpu_seconds": round(statistics.median(cpu for _, cpu in times[workers]), 2),
                            "sentencepiece_seconds": round(base_s, 2),
                            "sentencepiece_cpu_seconds": round(
                                statistics.median(cpu for _, cpu in times["baseline"]), 2
                            ),
                            "ratio_vs_sentencepiece": round(
                                statistics.median(b[0] / t[0] for b, t in zip(times["baseline"], times[workers])), 2
                            ),
                            "cpu_ratio_vs_sentencepiece": round(
                                statistics.median(b[1] / t[1] for b, t in zip(times["baseline"], times[workers])), 2
                            ),
                            "cpus": len(os.sched_getaffinity(0)),
                        }
                    ),
                    flush=True,
                )
            assert outputs[0] == outputs[1], "1 and 2 workers wrote different data"


if __name__ == "__main__":
    main()
