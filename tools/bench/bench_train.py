"""Throughput of a SimPO training step on a tiny Llama on the CPU, one JSON line per case.

The model of the issue: hidden 256, 4 layers, 8 heads, 4 query groups, vocabulary 8192,
256 tokens a sequence, 4 pairs a micro-batch (8 sequences). Two ways of doing the same work
(the same global batch of 8 pairs) are timed in one run, so their ratio survives a noisy
machine: one process (TP=1, all cores to torch) and two processes with TP=2 over gloo.
Tokens are counted as processed positions, 2 x pairs x seq_length, as Megatron-LM counts them.

    python tools/bench/bench_train.py [--steps 5] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402

MODEL = dict(
    num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8, num_query_groups=4,
    vocab_size=8192, seq_length=256, micro_batch_size=4, global_batch_size=8,
)


def _measure(tp: int, steps: int, warmup: int, threads: int) -> dict | None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from simpo_megatron.data.provider import build_datasets, micro_batches
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    torch.set_num_threads(threads)
    cfg = tiny_config(**MODEL, tensor_model_parallel_size=tp)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    cfg.validate(world)
    initialize_distributed(ParallelLayout(tensor_model_parallel_size=tp), seed=cfg.seed)
    data = build_datasets(cfg)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    stream = micro_batches(
        data.train, cfg, data.pad_id, 0,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
    )
    n_mb = cfg.num_micro_batches(world)
    times = []
    for step in range(warmup + steps):
        batches = [next(stream) for _ in range(n_mb)]
        start = time.perf_counter()
        train_step(cfg, state, batches)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if dist.get_rank() != 0:
        return None
    seconds = sorted(times)[len(times) // 2]
    pairs = cfg.global_batch_size
    return {
        "bench": "train_step",
        "case": f"tp{tp}",
        "processes": world,
        "threads_per_process": threads,
        "median_step_s": round(seconds, 4),
        "pairs_per_s": round(pairs / seconds, 2),
        "tokens_per_s": round(2 * pairs * cfg.seq_length / seconds, 1),
        "steps": steps,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    one = run_distributed(_measure, 1, 1, args.steps, args.warmup, cores)[0]
    two = run_distributed(_measure, 2, 2, args.steps, args.warmup, max(1, cores // 2))[0]
    print(json.dumps(one), flush=True)
    print(json.dumps(two), flush=True)
    print(json.dumps({"bench": "train_step", "case": "ratio", "tp2_over_tp1_tokens_per_s":
                      round(two["tokens_per_s"] / one["tokens_per_s"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
