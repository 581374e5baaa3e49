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


def _collective_and_callers(exc: BaseException) -> tuple[str | None, list[str]]:
    """The torch.distributed function ``exc`` was raised in, and the innermost frames of this
    package and of megatron-core that led there (file:line (function)), from its traceback."""
    collective, callers = None, {}
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if path.endswith("torch/distributed/distributed_c10d.py"):
            collective = frame.name
            continue
        for package in ("/simpo_megatron/", "/megatron/core/"):
            if package in path:
                callers[package] = f"{path[path.rindex(package) + 1 :]}:{frame.lineno} ({frame.name})"
    return collective, list(callers.values())


def collective_failure_message(exc: BaseException) -> str | None:
    """The user-facing message for ``exc`` if it is a failed collective, else None."""
    if not isinstance(exc, RuntimeError):
        return None
    collective, callers = _collective_and_callers(exc)
    is_dist_error = isinstance(exc, getattr(dist, "DistError", ()))
    if collective is None and not (is_dist_error or any(m in str(exc) for m in _TRANSPORT_MARKERS)):
        return None
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if collective is None:
        what = "a collective"
    elif collective.startswith("_"):  # e.g. _coalescing_manager: a batch of collectives
        what = f"a batch of collectives (torch.distributed.{collective})"
    else:
        what = f"torch.distributed.{collective}"
    where = f", called from {' via '.join(callers)}" if callers else ""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"rank {rank} of {world}: {what}{where} failed while {_phase}: {detail}. Another rank hung or died "
        "(see its output); if it is only slow, raise --distributed-timeout-minutes."
    )
