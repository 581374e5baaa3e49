"""Activation recompute on the UltraFeedback-shaped workload: memory kept for backward, peak
memory and step time with and without each mode, one JSON line per case.

The tiny Llama and the long-tailed pairs of ``bench_train.py --workload ultrafeedback``
(--seq-length 512, 8 pairs a step as 2 micro-batches of 4), padded to the longest sequence
and packed. Each case runs in a fresh process, so its peak resident memory (``ru_maxrss``) is
its own; ``kept_mib`` is what the forward of the largest micro-batch keeps for backward
(``SavedTensorMeter``: distinct saved storages, parameters left out), ``estimate_mib`` the
memory estimate's activations for the same micro-batch shape at worst (--seq-length).

    python tools/bench/bench_recompute.py [--steps 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import MODEL, UF_SEQ, ultrafeedback_pairs  # noqa: E402

MODES = {
    "off": {},
    "selective_core_attn": dict(recompute_granularity="selective"),
    "selective_core_attn_mlp": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
    "full_block_2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
LAYOUTS = {"padded_to_longest": {"pad_to_multiple_of": 8}, "packed": {"packing": True}}
MIB = 1024**2


def _measure(layout: str, mode: str, steps: int, warmup: int) -> dict:
    import resource

    import torch

    from simpo_megatron.data.provider import global_batches
    from simpo_megatron.memory_estimate import estimate_memory
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.saved_tensors import SavedTensorMeter
    from simpo_megatron.training.step import forward_step
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    torch.set_num_threads(1)
    cfg = tiny_config(**{**MODEL, "seq_length": UF_SEQ}, **LAYOUTS[layout], **MODES[mode]).validate(1)
    initialize_distributed(ParallelLayout(), seed=cfg.optimizer.seed)
    pairs = ultrafeedback_pairs(cfg.data.global_batch_size * (warmup + steps), cfg.model.vocab_size)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    model = state.model[0]
    stream = global_batches(pairs, cfg, 0, 0, 0, 1, shuffle=False)
    times, kept = [], 0
    for step in range(warmup + steps):
        batches = next(stream)
        if step == 0:
            model.train()
            for batch in batches:
                with SavedTensorMeter(exclude=list(model.parameters())) as meter:
                    output, loss_func = forward_step(cfg.loss, cfg.model.vocab_size, iter([batch]), model)
                    loss_func(output)
                kept = max(kept, meter.kept_bytes)
                del output, loss_func
        start = time.perf_counter()
        train_step(cfg, state, batches)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    estimate = estimate_memory(cfg, 1)
    return {
        "bench": "recompute_ultrafeedback",
        "layout": layout,
        "mode": mode,
        "kept_mib": round(kept / MIB, 2),
        "estimate_mib": round(estimate.activations_per_micro_batch / MIB, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "median_step_s": round(sorted(times)[len(times) // 2], 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    for layout in LAYOUTS:
        for mode in MODES:
            print(json.dumps(run_distributed(_measure, 1, layout, mode, args.steps, args.warmup)[0]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
