"""Which checkpoints a run keeps in ``--save``: ``--keep-last-checkpoints`` and ``--keep-checkpoint-every``.

Deletion runs on one rank, after a new checkpoint is complete (its tracker written), so it
never races a write. A checkpoint is first renamed to ``.iter_XXXXXXX.deleting`` (atomic) and
then removed: a crash half-way through leaves no half-deleted ``iter_*`` that looks loadable,
and the next pass finishes the removal.
"""

from __future__ import annotations

import glob
import os
import re

from simpo_megatron.checkpoint_format import checkpoint_dir, read_tracker
from simpo_megatron.fsutil import remove

_ITER_DIR = re.compile(r"iter_(\d{7,})")
_DELETING = ".deleting"


def saved_iterations(root: str) -> list[int]:
    """The iterations of the complete-looking ``iter_*`` directories under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    found = (_ITER_DIR.fullmatch(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(root, m.group(0))))


def checkpoints_to_delete(
    iterations: list[int], keep_last: int, keep_every: int | None = None, protected: set[int] = frozenset()
) -> list[int]:
    """The iterations to delete: all but the newest ``keep_last``, the multiples of
    ``keep_every`` and the ``protected`` ones (the tracker's, the one the run resumed from)."""
    newest = set(sorted(iterations)[-keep_last:]) if keep_last > 0 else set()
    return [
        i
        for i in sorted(iterations)
        if i not in newest and i not in protected and not (keep_every and i % keep_every == 0)
    ]


def prune_checkpoints(root: str, keep_last: int, keep_every: int | None = None, protected: set[int] = frozenset()):
    """Delete the checkpoints under ``root`` that ``checkpoints_to_delete`` names; returns their iterations.

    The iteration the tracker names is always kept.
    """
    for leftover in glob.glob(os.path.join(glob.escape(root), f".iter_*{_DELETING}")):
        remove(leftover)  # a removal that a crash interrupted
    tracked = read_tracker(root)
    keep = set(protected) | ({tracked} if tracked is not None else set())
    doomed = checkpoints_to_delete(saved_iterations(root), keep_last, keep_every, keep)
    for iteration in doomed:
        path = checkpoint_dir(root, iteration)
        trash = os.path.join(root, "." + os.path.basename(path) + _DELETING)
        os.replace(path, trash)
        remove(trash)
    return doomed
