#!/usr/bin/env bash
''':'
# SimPO on Megatron-Core: the torchrun launcher. Both of these work as typed:
#
#   bash examples/pretrain_simpo.sh [FLAGS...]
#   torchrun --nproc-per-node N examples/pretrain_simpo.sh [FLAGS...]
#
# This file is a bash script and a Python program at once: bash execs torchrun on the file
# itself, and torchrun runs it with python on every rank (the Python part is at the end).
# With no FLAGS it trains the tiny example on the embedded data (examples/data, preprocessed
# on first use) on 2 processes with TP=2, on the CPU when there is no GPU.
#
# Environment (as in Megatron-LM's examples):
#   GPUS_PER_NODE  processes per node (default: 2 for the example, else the GPUs, else 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   OUTPUT_DIR     where the example writes its checkpoint and metrics (default: runs/tiny)
set -euo pipefail
if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ $# -eq 0 ]; then
        GPUS_PER_NODE=2
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi -L | wc -l)
    else
        GPUS_PER_NODE=1
    fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    RENDEZVOUS=(--standalone)
else
    RENDEZVOUS=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
                --master-addr "${MASTER_ADDR:?set MASTER_ADDR for multi-node runs}"
                --master-port "${MASTER_PORT:-6000}")
fi
exec torchrun --nproc-per-node "$GPUS_PER_NODE" "${RENDEZVOUS[@]}" "$0" "$@"
'''
import fcntl
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")
TOKENIZER = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(DATA, "tokenizer.model")]


def example_args() -> list[str]:
    """Flags of the tiny example; preprocesses examples/data once (one rank at a time)."""
    prefixes = {split: os.path.join(DATA, f"{split}_pairs") for split in ("train", "valid")}
    with open(os.path.join(DATA, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for split, prefix in prefixes.items():
            if not (os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".meta.json")):
                subprocess.run(
                    [sys.executable, os.path.join(ROOT, "tools", "preprocess_preference_data.py"),
                     "--input", os.path.join(DATA, f"{split}.jsonl"), "--output-prefix", prefix,
                     *TOKENIZER],
                    check=True,
                )
    output = os.environ.get("OUTPUT_DIR", os.path.join(ROOT, "runs", "tiny"))
    return [
        "--config", os.path.join(ROOT, "examples", "configs", "tiny.yaml"),
        "--data-path", prefixes["train"], "--valid-data-path", prefixes["valid"], *TOKENIZER,
        "--save", output, "--load", output,
    ]


if __name__ == "__main__":
    import warnings

    # megatron-core warns at import that Apex / Transformer Engine are absent; on the CPU
    # that is expected, and where they matter the run itself says so.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
    sys.path.insert(0, ROOT)
    from simpo_megatron.training.loop import main

    sys.exit(main(sys.argv[1:] or example_args()))
