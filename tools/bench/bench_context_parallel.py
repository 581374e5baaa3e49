"""Memory per rank and step time of a long-sequence SimPO step at CP=1 and CP=2, one JSON line per case.

One pair of 8192-token sequences (``--seq-length``) on the tiny Llama of the tests, a full
training step (forward, backward, Adam): once on one process (CP=1), once split over two gloo
processes (CP=2, each holding half of every sequence), each process with its share of the
cores. Per rank it reports:

- ``activation_mib``: the tensors autograd keeps for backward during the step (counted once
  per storage through ``torch.autograd.graph.saved_tensors_hooks``): the memory that context
  parallelism divides;
- ``step_peak_rss_mib``: the process's peak resident memory during the steps above what it held
  before the first one (activations, gradients, optimizer state, temporaries; the model and its
  gradients are replicated over CP ranks, so this falls by less than 1/CP);
- ``median_step_s``: wall time of a step (CP=2 here also pays gloo all-gathers of keys and values).

    python tools/bench/bench_context_parallel.py [--seq-length 8192] [--steps 2] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402


class _SavedTensors:
    """Bytes of the distinct storages autograd saves for backward in the forward pass (what a
    checkpointed function saves again while it is recomputed in backward is not counted)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        import torch

        if torch._C._current_graph_task_id() == -1:  # not inside backward
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def _measure(cp: int, seq_length: int, steps: int, warmup: int, threads: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from simpo_megatron.data.provider import build_datasets, micro_batches
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    torch.set_num_threads(threads)
    cfg = tiny_config(seq_length=seq_length, context_parallel_size=cp, micro_batch_size=1, global_batch_size=1)
    cfg.validate(cp)
    initialize_distributed(ParallelLayout(context_parallel_size=cp), seed=cfg.optimizer.seed)
    data = build_datasets(cfg)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    stream = micro_batches(
        data.train,
        cfg,
        data.pad_id,
        0,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    saved = _SavedTensors()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        train_step(cfg, state, [next(stream)])  # also the warm-up
    activation = saved.mib
    times = []
    for step in range(warmup - 1 + steps):
        batch = next(stream)
        start = time.perf_counter()
        train_step(cfg, state, [batch])
        if step >= warmup - 1:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "bench": "context_parallel",
        "case": f"cp{cp}",
        "rank": dist.get_rank(),
        "seq_length": seq_length,
        "tokens_per_rank": 2 * seq_length // cp,
        "threads_per_process": threads,
        "activation_mib": round(activation, 1),
        "step_peak_rss_mib": round((peak - before) / 1024, 1),
        "median_step_s": round(sorted(times)[len(times) // 2], 3),
        "steps": steps,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    args = parser.parse_args(argv)
    args.warmup = max(args.warmup, 1)
    cores = os.cpu_count() or 1
    results = {}
    for cp in (1, 2):
        ranks = run_distributed(_measure, cp, cp, args.seq_length, args.steps, args.warmup, max(1, cores // cp))
        for line in ranks:
            print(json.dumps(line), flush=True)
        results[cp] = ranks
    one, two = results[1][0], max(results[2], key=lambda r: r["activation_mib"])
    print(
        json.dumps(
            {
                "bench": "context_parallel",
                "case": "ratio",
                "cp2_over_cp1_activation": round(two["activation_mib"] / one["activation_mib"], 3),
                "cp2_over_cp1_step_peak_rss": round(two["step_peak_rss_mib"] / max(one["step_peak_rss_mib"], 1e-9), 3),
                "cp2_over_cp1_step_time": round(two["median_step_s"] / one["median_step_s"], 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
