"""The on-disk layout of a checkpoint root, shared by training and the HF conversion.

As Megatron-LM: ``ROOT/iter_0000100/`` holds one megatron-core dist checkpoint, and
``ROOT/latest_checkpointed_iteration.txt`` names the newest complete one. Nothing here
needs a model or a process group.
"""

from __future__ import annotations

import os

TRACKER_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not fit this run."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    """The iteration of the newest complete checkpoint under ``root``, or None if there is none."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path, errors="replace").read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def resolve_checkpoint(load: str) -> str:
    """The dist checkpoint directory of ``load``: a root (via its tracker) or an iter_* directory."""
    iteration = read_tracker(load)
    if iteration is not None:
        ckpt = checkpoint_dir(load, iteration)
        if not os.path.isdir(ckpt):
            raise CheckpointError(
                f"{os.path.join(load, TRACKER_FILE)} names iteration {iteration}, but {ckpt} is missing"
            )
        return ckpt
    if os.path.isfile(os.path.join(load, "metadata.json")):
        return load
    raise CheckpointError(f"{load}: not a Megatron checkpoint (no {TRACKER_FILE} and no metadata.json)")
