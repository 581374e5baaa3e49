#!/usr/bin/env bash
''':'
# SimPO on Megatron-Core: the torchrun launcher. Both of these work as typed:
#
#   bash examples/pretrain_simpo.sh [FLAGS...]
#   torchrun --nproc-per-node N examples/pretrain_simpo.sh [FLAGS...]
#
# This file is a bash script and a Python program at once: bash execs torchrun on the file
# itself, and torchrun runs it with python on every rank (the Python part is at the end).
# Without --config, --data-path or --mock-data it trains the tiny example on the embedded data
# (examples/data, preprocessed on first use), the FLAGS applying on top of the example's, on 2
# processes with TP=2, on the CPU when there is no GPU.
#
# Environment (as in Megatron-LM's examples):
#   GPUS_PER_NODE  processes per node (default: 2 for the example, else the GPUs that
#                  CUDA_VISIBLE_DEVICES or nvidia-smi lists, else 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   OUTPUT_DIR     where the example writes its checkpoint and metrics (default: runs/tiny)
#   PYTHON         the interpreter for `-m torch.distributed.run` when torchrun is not on PATH
#   MAX_RESTARTS   torchrun --max-restarts: after a worker fails, restart all of this node's
#                  workers up to this many times (default 0); each restart resumes from the
#                  newest checkpoint in --save
set -euo pipefail
own_run=0
for arg in "$@"; do
    case "$arg" in --config|--config=*|--data-path|--data-path=*|--mock-data) own_run=1 ;; esac
done
if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ "$own_run" -eq 0 ]; then
        GPUS_PER_NODE=2
    elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
        GPUS_PER_NODE=${#visible[@]}
        [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=1  # every GPU hidden: one CPU process
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU' || true)  # grep -c exits 1 when it counts 0
        [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=1
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
if command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=(torchrun)
else
    TORCHRUN=("${PYTHON:-python3}" -m torch.distributed.run)
fi
RESTARTS=()
if [ -n "${MAX_RESTARTS:-}" ]; then
    RESTARTS=(--max-restarts "$MAX_RESTARTS")
fi
exec "${TORCHRUN[@]}" --nproc-per-node "$GPUS_PER_NODE" "${RENDEZVOUS[@]}" ${RESTARTS[@]+"${RESTARTS[@]}"} "$0" "$@"
'''
import os
import sys

# Guarded: process pools (spawn) re-import this file as their main module.
if __name__ == "__main__":
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds the example data
    try:
        import simpo_megatron  # noqa: F401  the installed package
    except ImportError:  # not installed: run from this checkout
        sys.path.insert(0, checkout)
    from simpo_megatron.cli import main

    sys.exit(main(sys.argv[1:], example_root=checkout))
# bash -n reads on to here: the quote that ends this line closes the string bash opened above '
