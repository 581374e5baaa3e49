"""A collective that fails (a rank hung past ``--distributed-timeout-minutes``, or died) as a
message naming this rank, the collective and what the run was doing, instead of a bare
transport error.

gloo's error text names neither the operation nor the peer ("Timed out waiting 60000ms for
recv operation to complete", "Connection closed by peer"), so the collective is read from the
exception's traceback (the torch.distributed function it was raised in) and the run's phase
from ``set_phase``, which the loop and the checkpointer call as they go.
"""

from __future__ import annotations

import os
import traceback

import torch.distributed as dist

_phase = "starting up"

# Text of the transport errors a failed collective raises (gloo's, and torch's c10d wrappers).
_TRANSPORT_MARKERS = ("gloo", "Timed out waiting", "Connection closed by peer", "Connection reset by peer", "c10d")


def set_phase(what: str) -> None:
    """Record what the run is doing now (e.g. "training iteration 12"), for the message."""
    global _phase
    _phase = what


def current_phase() -> str:
    return _phase


def _collective_and_caller(exc: BaseException) -> tuple[str | None, str | None]:
    """The torch.distributed function ``exc`` was raised in, and the innermost caller in this
    package (file:line), from its traceback."""
    collective = caller = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if path.endswith("torch/distributed/distributed_c10d.py"):
            collective = frame.name
        elif "/simpo_megatron/" in path:
            caller = f"{path[path.rindex('/simpo_megatron/') + 1 :]}:{frame.lineno} ({frame.name})"
    return collective, caller


def collective_failure_message(exc: BaseException) -> str | None:
    """The user-facing message for ``exc`` if it is a failed collective, else None."""
    if not isinstance(exc, RuntimeError):
        return None
    collective, caller = _collective_and_caller(exc)
    is_dist_error = isinstance(exc, getattr(dist, "DistError", ()))
    if collective is None and not (is_dist_error or any(m in str(exc) for m in _TRANSPORT_MARKERS)):
        return None
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    what = f"torch.distributed.{collective}" if collective else "a collective"
    where = f", called from {caller}" if caller else ""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"rank {rank} of {world}: {what}{where} failed while {_phase}: {detail}. Another rank hung or died "
        "(see its output); if it is only slow, raise --distributed-timeout-minutes."
    )
