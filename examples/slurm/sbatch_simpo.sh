#!/bin/bash
# SimPO on Llama-3-8B-Instruct over several nodes with Slurm: one srun task per node, each
# running examples/pretrain_simpo.sh, which starts torchrun with one process per GPU.
#
#   cd /path/to/simpo-megatron            # the job runs in the directory it was submitted from
#   sbatch examples/slurm/sbatch_simpo.sh [EXTRA FLAGS...]
#   sbatch --nodes 8 examples/slurm/sbatch_simpo.sh --train-iters 100
#
# EXTRA FLAGS go to the training run after the ones below and override them and the recipe
# (examples/configs/llama3-8b-instruct.yaml: TP=2, global batch 128 pairs, so the data-parallel
# size NNODES x GPUS_PER_NODE / 2 must divide 128: 1, 2, 4, 8 or 16 nodes of 8 GPUs).
#
# Paths are variables: set them here or in the environment (sbatch passes the environment on):
#   HF_MODEL      Hugging Face model directory (weights and tokenizer)
#   TRAIN_DATA    preprocessed prefix(es) (tools/preprocess_preference_data.py), e.g. "/data/uf_train"
#                 or weighted "0.7 /data/a 0.3 /data/b"
#   VALID_DATA    preprocessed validation prefix (set it empty to use --split of TRAIN_DATA)
#   CKPT_DIR      checkpoints, metrics.jsonl; on a file system that every node sees
#   LOAD          what to start from: HF_MODEL (loaded straight into the model; a restart resumes from CKPT_DIR)
#                 or a Megatron checkpoint, e.g. one made beforehand on one machine with
#                 python tools/convert_hf_checkpoint.py import --hf-dir "$HF_MODEL" --output DIR
#                 --tensor-model-parallel-size 2 (a large model converts faster that way than
#                 within the job's start-up). A requeued or resubmitted job resumes from CKPT_DIR.
#   MAX_RESTARTS  torchrun restarts of a node's workers after one fails (default 1); each resumes
#                 from the newest checkpoint in CKPT_DIR
#   REQUEUE       1 (default): when the time-limit warning stopped the run, requeue the job,
#                 which resumes from CKPT_DIR; 0: just end
#
# Unattended: 120 s before --time runs out Slurm sends SIGTERM to this script (--signal below),
# which passes it to srun and so to torchrun and the training processes: they save a checkpoint
# at the end of the current iteration and exit (torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds for them), and the job requeues itself. Keep the warning longer than a save takes.
#
#SBATCH --job-name=simpo-llama3-8b-instruct
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:TERM@120

set -euo pipefail

HF_MODEL=${HF_MODEL:-/models/Meta-Llama-3-8B-Instruct}
TRAIN_DATA=${TRAIN_DATA:-/data/llama3-ultrafeedback-armorm/train}
VALID_DATA=${VALID_DATA-/data/llama3-ultrafeedback-armorm/test}
CKPT_DIR=${CKPT_DIR:-/checkpoints/simpo/llama3-8b-instruct}
LOAD=${LOAD:-$HF_MODEL}
CONFIG=${CONFIG:-examples/configs/llama3-8b-instruct.yaml}

cd "${SIMPO_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
if [ ! -f examples/pretrain_simpo.sh ]; then
    echo "error: run sbatch from the simpo-megatron directory (or set SIMPO_ROOT)" >&2
    exit 1
fi

# Rendezvous for torchrun, as examples/pretrain_simpo.sh reads it. NODE_RANK differs per node,
# so it is set inside each srun task below, from that task's SLURM_NODEID.
# The first host; no `| head -n 1`: under pipefail, scontrol writing the rest of a long host
# list into the closed pipe (SIGPIPE) would stop the job.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NNODES=$SLURM_NNODES
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export MASTER_ADDR MASTER_PORT NNODES GPUS_PER_NODE
export MAX_RESTARTS=${MAX_RESTARTS:-1}
# How long torchrun lets the workers save after SIGTERM before it kills them (its default: 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}

# As Megatron-LM's examples: one CUDA work queue, so that communication and compute kernels
# are issued in order (needed to overlap tensor-parallel communication).
export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Cluster-specific NCCL settings (network interface, InfiniBand HCAs) go here, e.g.:
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5

mkdir -p "$CKPT_DIR"

ARGS=(
    --config "$CONFIG"
    --load "$LOAD"
    --save "$CKPT_DIR"
    --save-interval 100
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model "$HF_MODEL"
)
# TRAIN_DATA may hold several words ("weight prefix ..."): split it into separate arguments.
read -r -a TRAIN_WORDS <<< "$TRAIN_DATA"
ARGS+=(--data-path "${TRAIN_WORDS[@]}")
if [ -n "$VALID_DATA" ]; then
    read -r -a VALID_WORDS <<< "$VALID_DATA"
    ARGS+=(--valid-data-path "${VALID_WORDS[@]}")
fi
ARGS+=("$@")

echo "SimPO: $NNODES nodes x $GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT, checkpoints $CKPT_DIR"

# One task per node; each gets every CPU of its node (torchrun's workers share them).
# The single quotes are deliberate: SLURM_NODEID is expanded by each task, on its own node.
# srun runs in the background so that this shell can pass the time-limit warning on (a trap
# runs only once the command in the foreground ends).
stop_requested=0
srun_pid=
on_term() {
    stop_requested=1
    echo "SimPO: SIGTERM (the time limit is near): the run saves a checkpoint and stops"
    if [ -n "$srun_pid" ]; then kill -TERM "$srun_pid" 2>/dev/null || true; fi
}
trap on_term TERM
# shellcheck disable=SC2016
srun --nodes="$NNODES" --ntasks-per-node=1 --ntasks="$NNODES" \
    --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
    bash -c 'export NODE_RANK=$SLURM_NODEID; exec bash examples/pretrain_simpo.sh "$@"' simpo "${ARGS[@]}" &
srun_pid=$!
if [ "$stop_requested" -eq 1 ]; then kill -TERM "$srun_pid" 2>/dev/null || true; fi  # it came first
status=0
# `wait` returns early when the trap runs: wait again until srun has ended.
while true; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
trap - TERM
if [ "$stop_requested" -eq 1 ] && [ "${REQUEUE:-1}" -eq 1 ]; then
    echo "SimPO: requeueing job $SLURM_JOB_ID; it resumes from $CKPT_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
[ "$status" -eq 0 ] || exit "$status"

echo "metrics: $CKPT_DIR/metrics.jsonl (plot: python tools/plot_metrics.py --metrics $CKPT_DIR/metrics.jsonl --output simpo.png)"
