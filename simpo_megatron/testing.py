"""Helpers for tests: run a function on several gloo processes and a tiny model config.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes that each set up
torch.distributed the way torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), call
``fn(*args)`` and send its return value back; it returns the values in rank order and
re-raises the first failure with the worker's traceback.

Workers are forked from a forkserver that has imported torch and megatron-core once, so each
group starts in a fresh process without paying those imports again (most of a tiny test's
time on a small machine). ``SIMPO_TEST_START_METHOD=spawn`` starts them the slow, plain way.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from simpo_megatron.config import SimPOConfig


def tiny_config(**overrides) -> SimPOConfig:
    """A small Llama-shaped model that trains in seconds on a CPU (GQA: 4 heads, 2 groups)."""
    values = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=200,
        make_vocab_size_divisible_by=128,
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=4,
        mock_data=True,
        lr=1e-3,
        clip_grad=1.0,
        train_iters=10,
    )
    values.update(overrides)
    return SimPOConfig.from_flat(values)


class _ParentFd:
    """The parent's file descriptor ``fd`` as it is at ``Process.start``, sent to the child.

    A forkserver's children inherit the forkserver's stdout and stderr, fixed when it started;
    the workers write to the parent's current ones instead (where pytest's capture points).
    """

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return (_detach, (DupFd(self.fd),))


def _detach(dup) -> int:
    return dup.detach()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue, stdio=()) -> None:
    for target, fd in zip((1, 2), stdio):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        from simpo_megatron.runtime import destroy_distributed

        try:
            destroy_distributed()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# Imported once by the forkserver; only third-party modules, so the workers import this
# package from the parent's sys.path as spawn would.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "transformers",
]


def _context():
    method = os.environ.get("SIMPO_TEST_START_METHOD", "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 600) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return their results by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = _context()
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, queue, (_ParentFd(1), _ParentFd(2))),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not failures:
        try:
            rank, ok, value = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                failures.append(f"ranks {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
            elif time.monotonic() > deadline:
                failures.append(f"timed out after {timeout} s")
            continue
        if ok:
            results[rank] = value
        else:
            failures.append(f"rank {rank} failed:\n{value}")
    for p in procs:
        p.join(timeout=5 if failures else timeout)
        if p.is_alive():
            p.kill()
    if failures:
        raise RuntimeError("\n".join(failures))
    return [results[r] for r in range(world_size)]


def save_reference_weights(cfg: SimPOConfig, path: str, seed: int = 7):
    """Build ``cfg``'s model in a world of one, save its weights to ``path`` (weights only) and
    return the TrainState: the one set of weights that layout tests load into every layout.

    The caller tears the parallel state down when done with the state.
    """
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.checkpointing import save_checkpoint
    from simpo_megatron.training.trainer import setup_model_and_optimizer

    initialize_distributed(ParallelLayout(), seed=seed)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    save_checkpoint(path, state, weights_only=True)
    return state
