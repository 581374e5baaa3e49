"""Process-group and parallel-state set-up, and CPU support for megatron-core.

megatron-core 0.16.1 assumes CUDA in a number of places (``device="cuda"`` literals,
``torch.cuda.current_device()``, ``param.type() == 'torch.cuda.FloatTensor'`` checks, the
CUDA RNG tracker). ``enable_cpu_support()`` meets those assumptions on a CPU-only machine
so that the unmodified megatron-core schedules, optimizers and tensor-parallel layers run
over gloo. It is active only without CUDA; with CUDA nothing is patched.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_CPU_SUPPORT_ENABLED = False


def _to_cpu_device(device):
    """Map any non-CPU device spec (``"cuda"``, ``"cuda:1"``, an int, a torch.device) to CPU."""
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device if device.type == "cpu" else _CPU
    if isinstance(device, (int, str)):
        return _CPU if str(device) not in ("cpu", "meta") else torch.device(device)
    return device


_TENSOR_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements to the CPU for every torch call made under it.

    ``Tensor.cuda()`` becomes a no-op, ``device=`` arguments that name CUDA become CPU, and
    ``Tensor.type()`` reports the CUDA type name megatron-core's optimizers check for.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _TENSOR_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        # Tensor.to(device, ...): the device is the first argument after the tensor.
        if func is torch.Tensor.to and len(args) >= 2 and isinstance(args[1], (torch.device, str, int)):
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for a CUDA stream or event on the CPU, where work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def enable_cpu_support() -> None:
    """Let megatron-core 0.16.1 run on the CPU; a no-op when CUDA is available.

    Idempotent. Enters a process-wide TorchFunctionMode and replaces the handful of
    ``torch.cuda`` functions megatron-core calls unconditionally with CPU equivalents.
    """
    global _CPU_SUPPORT_ENABLED
    if torch.cuda.is_available() or _CPU_SUPPORT_ENABLED:
        return
    _CPU_SUPPORT_ENABLED = True

    # Advice for CUDA streams, which do not exist here.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    from megatron.core.tensor_parallel import random as tp_random

    # The "CUDA" generator is the CPU one here, so the tracker's fork does change it, by design.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    _CudaToCpuMode().__enter__()


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of one run, as megatron-core's parallel state sees them."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1


def initialize_distributed(
    layout: ParallelLayout,
    seed: int = 1234,
    timeout_minutes: int = 10,
) -> None:
    """Start torch.distributed (nccl with CUDA, gloo without) and megatron's parallel state.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them;
    a plain ``python`` run is a world of one.
    """
    from megatron.core import parallel_state

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        enable_cpu_support()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
            context_parallel_size=layout.context_parallel_size,
        )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch, and megatron's model-parallel RNG tracker.

    Each pipeline stage gets its own stream (as Megatron-LM does), while tensor-parallel
    ranks share the default stream and differ in the tracker's model-parallel stream.
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    # Seeds the CUDA generator, which enable_cpu_support() maps to the CPU one: seed it first.
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the process group (tests start several)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
