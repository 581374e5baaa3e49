"""Process-group and parallel-state set-up, and CPU support for megatron-core.

megatron-core 0.16.1 assumes CUDA in a number of places (``device="cuda"`` literals,
``torch.cuda.current_device()``, ``param.type() == 'torch.cuda.FloatTensor'`` checks, the
CUDA RNG tracker). On a machine without CUDA, ``initialize_distributed`` meets those
assumptions so that the unmodified megatron-core schedules, optimizers and tensor-parallel
layers run over gloo, and ``destroy_distributed`` undoes it; with CUDA nothing is patched.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
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
        if kwargs.get("pin_memory"):  # e.g. megatron-core's RoPE slicing for context parallelism
            kwargs["pin_memory"] = False
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


def _splits_to_numpy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron-core's ``maybe_move_tensor_to_cpu`` for tensors already on the CPU."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _gather_uneven_on_gloo(gather):
    """megatron-core's ``_gather_along_first_dim``, also for parts of different lengths, which
    gloo's all_gather refuses (the MoE dispatcher's gather over tensor-parallel ranks): every
    part is padded to the longest, gathered, and cut back."""

    @functools.wraps(gather)
    def run(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)])

    return run


def _reduce_scatter_uneven_on_gloo(reduce_scatter):
    """megatron-core's ``_reduce_scatter_along_first_dim``, also for parts of different lengths
    (gloo has no list reduce-scatter): the whole tensor is all-reduced, this rank keeps its part."""

    @functools.wraps(reduce_scatter)
    def run(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total.split(input_split_sizes, dim=0)[group.rank()].clone()

    return run


def _under_cpu_mode(fn):
    """``fn`` run under a ``_CudaToCpuMode`` of its own (whatever thread calls it)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    return run


class _CpuSupport:
    """Meets megatron-core's CUDA assumptions on the CPU, between ``enter()`` and ``exit()``.

    Enters a TorchFunctionMode and replaces the handful of ``torch.cuda`` functions (and two
    of megatron's RNG helpers) that megatron-core calls unconditionally with CPU equivalents;
    ``exit()`` puts every one of them back. ``initialize_distributed`` enters it on a machine
    without CUDA and ``destroy_distributed`` leaves it, so it is active only while a
    megatron-core world exists.

    The CUDA generator is the CPU one here: megatron's RNG tracker seeds, forks and stores CPU
    generator states (its model-parallel stream, per TP rank, is what attention dropout draws
    from), and checkpoints save and restore them with torch's own state.
    """

    _CUDA_STAND_INS = {
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "device_count": lambda: 0,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "Stream": _NullStream,
        "Event": _NullStream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
    }

    def __init__(self):
        self._saved: list[tuple[object, str, object]] = []
        self._mode: _CudaToCpuMode | None = None
        self._log_filter = None
        self._warnings_filters = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def _replace(self, owner, name: str, value) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def enter(self) -> None:
        if self.active:
            return
        from megatron.core.tensor_parallel import random as tp_random

        self._warnings_filters = warnings.filters[:]
        # Advice for CUDA streams, which do not exist here.
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        for name, value in self._CUDA_STAND_INS.items():
            self._replace(torch.cuda, name, value)
        self._replace(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
        self._replace(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
        # The MoE all-to-all dispatcher turns its split sizes into numpy arrays only when they
        # leave a GPU; CPU tensors would reach all_to_all_single, which wants sequences of ints.
        from megatron.core.transformer.moe import token_dispatcher

        self._replace(token_dispatcher, "maybe_move_tensor_to_cpu", _splits_to_numpy)
        # Communication buffers are made with device=torch.cuda.current_device(), also when
        # backward makes them, on autograd's thread, where the (thread-local) mode is not active:
        # the all-to-all's forward (backward calls it) and every tensor-parallel backward
        # (sequence parallelism's gathers and reduce-scatters, activation recompute's re-run forward)
        # run under a mode of their own.
        from megatron.core.tensor_parallel import layers, mappings

        self._replace(mappings._AllToAll, "forward", staticmethod(_under_cpu_mode(mappings._AllToAll.forward)))
        self._replace(mappings, "_gather_along_first_dim", _gather_uneven_on_gloo(mappings._gather_along_first_dim))
        self._replace(
            mappings,
            "_reduce_scatter_along_first_dim",
            _reduce_scatter_uneven_on_gloo(mappings._reduce_scatter_along_first_dim),
        )
        for module in (mappings, layers, tp_random):  # tp_random: recompute's CheckpointFunction
            for cls in list(vars(module).values()):
                if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and "backward" in vars(cls):
                    self._replace(cls, "backward", staticmethod(_under_cpu_mode(cls.backward)))
        # The "CUDA" generator is the CPU one here, so the tracker's fork does change it, by design.
        self._log_filter = lambda record: "CPU RNG state changed" not in record.getMessage()
        logging.getLogger(tp_random.__name__).addFilter(self._log_filter)
        self._mode = _CudaToCpuMode()
        self._mode.__enter__()

    def exit(self) -> None:
        if not self.active:
            return
        from megatron.core.tensor_parallel import random as tp_random

        self._mode.__exit__(None, None, None)
        self._mode = None
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()
        logging.getLogger(tp_random.__name__).removeFilter(self._log_filter)
        warnings.filters[:] = self._warnings_filters


_CPU_SUPPORT = _CpuSupport()
_ENV_SET: list[str] = []  # rendezvous variables initialize_distributed set itself


def cpu_support_active() -> bool:
    """Whether the CPU stand-ins for megatron-core's CUDA calls are in place (tests check this)."""
    return _CPU_SUPPORT.active


def pipeline_communication_settings(layout: ParallelLayout | None = None) -> dict[str, bool]:
    """TransformerConfig's pipeline p2p fields for the process group's backend (and ``layout``).

    NCCL (Megatron-LM's defaults): batched isend/irecv, and a stage's output freed once sent
    (stream-ordered, so safe). Gloo matches messages between two ranks in posting order, and
    the batched order (send_prev before send_next) does not match the receiver's when both
    neighbours are the same rank (interleaved PP=2): activations and gradients would swap; its
    sends are asynchronous and may still read the output, so outputs are kept.
    Micro-batches are padded to their own longest sequence, so pipeline stages exchange shapes
    first (``variable_seq_lengths``), except for the interleaved schedule on gloo, whose shape
    exchange can deadlock (seen with 2 micro-batches at PP=2): there the trainer gives all
    micro-batches of a step one shape instead.
    """
    backend = dist.get_backend() if dist.is_initialized() else ("nccl" if torch.cuda.is_available() else "gloo")
    nccl = backend == "nccl"
    settings = {"batch_p2p_comm": nccl, "deallocate_pipeline_outputs": nccl}
    if layout is not None:
        interleaved = layout.virtual_pipeline_model_parallel_size is not None
        settings["variable_seq_lengths"] = layout.pipeline_model_parallel_size > 1 and (nccl or not interleaved)
        # Unused by dense models, but its default ("allgather") refuses variable_seq_lengths.
        settings["moe_token_dispatcher_type"] = "alltoall"
    return settings


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of one run, as megatron-core's parallel state sees them."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    cp_comm_type: str = "p2p"
    expert_model_parallel_size: int = 1


def initialize_distributed(
    layout: ParallelLayout,
    seed: int = 1234,
    timeout_minutes: float = 10,
) -> None:
    """Start torch.distributed (nccl with CUDA, gloo without) and megatron's parallel state.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them;
    a plain ``python`` run is a world of one. ``timeout_minutes`` bounds every collective
    (the world's and megatron's groups): a rank waiting longer for the others raises.
    """
    from megatron.core import parallel_state

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        _CPU_SUPPORT.enter()
    if not dist.is_initialized():
        # A plain `python` run: a world of one. What is set here goes again on destroy, so
        # that a later torchrun or process group started from this process starts clean.
        for name, default in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", None),
        ):
            if name not in os.environ:
                os.environ[name] = default or str(_free_port())
                _ENV_SET.append(name)
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout, **_attempt_store(timeout))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
            context_parallel_size=layout.context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
            expert_model_parallel_size=layout.expert_model_parallel_size,
        )
    _TIMEOUT[:] = [datetime.timedelta(minutes=timeout_minutes)]
    set_seed(seed)


# Gloo copies of the pipeline groups, by ranks (every rank keeps every group's entry, so that all
# agree on which exist); cleared with the process group.
_PIPELINE_GLOO_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}
_TIMEOUT: list[datetime.timedelta] = []  # initialize_distributed's, for the groups made later


def pipeline_gloo_group() -> dist.ProcessGroup | None:
    """This rank's pipeline group on gloo, for small host-side exchanges between stages that must
    not wait in line with their activations; None with one stage.

    The first call for a layout creates every pipeline group's copy (every rank must make it, in
    the same order): call it where all ranks are, as when building the model.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    mine = tuple(dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()))
    if mine not in _PIPELINE_GLOO_GROUPS:
        everyone: list[tuple[int, ...] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        timeout = _TIMEOUT[0] if _TIMEOUT else None
        for ranks in sorted(set(everyone)):
            _PIPELINE_GLOO_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", timeout=timeout)
    return _PIPELINE_GLOO_GROUPS[mine]


def _attempt_store(timeout: datetime.timedelta) -> dict:
    """Under torchrun, a store whose keys are this attempt's own (init_process_group's arguments).

    torchrun keeps one TCP store across ``--max-restarts``: without a prefix, a restarted worker
    group would read the addresses its dead predecessors published there and fail to connect.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"attempt_{attempt}/", store), "rank": rank, "world_size": world_size}


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch, and megatron's model-parallel RNG tracker.

    Each pipeline stage gets its own stream (as Megatron-LM does), while tensor-parallel
    ranks share the default stream and differ in the tracker's model-parallel stream.
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    # Seeds the CUDA generator, which the CPU support maps to the CPU one: seed it first.
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the process group (tests start several)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _PIPELINE_GLOO_GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    while _ENV_SET:
        os.environ.pop(_ENV_SET.pop(), None)
    _CPU_SUPPORT.exit()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
