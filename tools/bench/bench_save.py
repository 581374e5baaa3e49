"""Step-time cost of a checkpoint save, synchronous against --async-save, one JSON line each.

A Llama-shaped model (by default hidden 512, 8 layers, vocabulary 8192: about 30 M parameters,
with Adam state about 0.4 GB on disk) trains on mock pairs in one process. Every
``--save-every`` steps the Checkpointer saves, as the training loop does; the cost of a save is
the time of an iteration that saves minus the median of those that do not, averaged over the
saves. For --async-save the iteration that saves also forks the writer; the write itself runs
while the next steps train, and each step polls for completion (a collective, as in the loop).
``write_s`` is the time from a save's start to its completion (the tracker written).

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
    plain, saving, started, writes = [], [], {}, []
    for _ in range(steps):
        batches = next(stream)
        start = time.perf_counter()
        for iteration in checkpointer.finalize_async_saves():
            writes.append(time.perf_counter() - started.pop(iteration))
        train_step(cfg, state, batches)
        if cfg.checkpoint.save_interval and state.iteration % save_every == 0:
            started[state.iteration] = time.perf_counter()
            checkpointer.save_if_due(state)
            if mode == "sync":
                writes.append(time.perf_counter() - started.pop(state.iteration))
            saving.append(time.perf_counter() - start)
        else:
            plain.append(time.perf_counter() - start)
    for iteration in checkpointer.finalize_async_saves(blocking=True):
        writes.append(time.perf_counter() - started.pop(iteration))
    ckpt = os.path.join(save, f"iter_{save_every:07d}")
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    step = statistics.median(plain[1:] or plain)  # the first step warms up
    return {
        "bench": "checkpoint_save",
        "mode": mode,
        "parameters_m": round(sum(p.numel() for p in state.model[0].parameters()) / 1e6, 1),
        "checkpoint_mb": round(size / 2**20, 1),
        "saves": len(saving),
        "step_s": round(step, 3),
        "save_step_cost_s": round(statistics.mean(saving) - step, 3),
        "write_s": round(statistics.mean(writes), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        for mode in ("sync", "async"):
            result = run_distributed(
                _measure, 1, mode, args.steps, args.save_every, args.hidden_size, args.num_layers, root, timeout=3600
            )[0]
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
