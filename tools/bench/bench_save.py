"""Step-time cost of a checkpoint save, synchronous against --async-save, one JSON line each.

A Llama-shaped model (by default hidden 512, 8 layers, vocabulary 8192: about 30 M parameters,
with Adam state about 0.4 GB on disk) trains on mock pairs in one process. The same
steps run three times: without saves, saving every ``--save-every`` steps synchronously, and
with --async-save (the write runs in a forked process while the next steps train; each step
polls for completion, as the loop does). ``cost_per_save_s``: what the saves added to the run's
wall time, per save; ``blocking_s``: the time the save call itself holds the step loop;
``write_s``: from a save's start to its completion (the tracker written).

    python tools/bench/bench_save.py [--steps 12] [--save-every 4] [--hidden-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from simpo_megatron.testing import run_distributed, tiny_config  # noqa: E402


def _measure(mode: str, steps: int, save_every: int, hidden: int, layers: int, root: str) -> dict:
    from megatron.core import parallel_state

    from simpo_megatron.data.provider import build_datasets, global_batches
    from simpo_megatron.runtime import initialize_distributed
    from simpo_megatron.training.checkpointing import Checkpointer
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    save = os.path.join(root, mode)
    cfg = tiny_config(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=4 * hidden,
        num_attention_heads=8,
        num_query_groups=4,
        vocab_size=8192,
        seq_length=128,
        save=save,
        save_interval=save_every,
        async_save=mode == "async",
        train_iters=steps,
    )
    cfg.validate(1)
    initialize_distributed(cfg.parallel_layout(), seed=cfg.optimizer.seed)
    data = build_datasets(cfg)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    checkpointer = Checkpointer(cfg)
    stream = global_batches(
        data.train,
        cfg,
        data.pad_id,
        0,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    blocked, started, writes = [], {}, []
    begin = time.perf_counter()
    for _ in range(steps):
        for iteration in checkpointer.finalize_async_saves():
            writes.append(time.perf_counter() - started.pop(iteration))
        train_step(cfg, state, next(stream))
        if mode != "none" and state.iteration % save_every == 0:
            started[state.iteration] = time.perf_counter()
            checkpointer.save_if_due(state)
            blocked.append(time.perf_counter() - started[state.iteration])
            if mode == "sync":
                writes.append(time.perf_counter() - started.pop(state.iteration))
    for iteration in checkpointer.finalize_async_saves(blocking=True):
        writes.append(time.perf_counter() - started.pop(iteration))
    total = time.perf_counter() - begin
    result = {
        "bench": "checkpoint_save",
        "mode": mode,
        "parameters_m": round(sum(p.numel() for p in state.model[0].parameters()) / 1e6, 1),
        "steps": steps,
        "saves": len(blocked),
        "total_s": round(total, 2),
    }
    if blocked:
        ckpt = os.path.join(save, f"iter_{save_every:07d}")
        result["checkpoint_mb"] = round(sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)) / 2**20)
        result["blocking_s"] = round(statistics.mean(blocked), 3)  # the save call, in the step loop
        result["write_s"] = round(statistics.mean(writes), 3)  # from the save's start to its completion
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        baseline = None
        for mode in ("none", "sync", "async"):
            result = run_distributed(
                _measure, 1, mode, args.steps, args.save_every, args.hidden_size, args.num_layers, root, timeout=3600
            )[0]
            if mode == "none":
                baseline = result["total_s"]
            else:  # what the saves added to the run's wall time, per save
                result["cost_per_save_s"] = round((result["total_s"] - baseline) / result["saves"], 3)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
