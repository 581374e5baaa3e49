"""Atomic publication of outputs: every file or directory the product writes appears whole or not at all.

The one scheme: write to a temporary path beside the output, make its contents durable
(fsync every file), rename it into place, and make the rename durable (fsync the parent
directory). ``staged(path)`` does all of it for one process; ``publish(tmp, path)`` is the
last two steps, for writers that stage elsewhere (several ranks writing one checkpoint).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
from collections.abc import Iterator


def fsync_directory(path: str) -> None:
    """Make renames inside ``path`` durable (a rename is only on disk once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync a file, or every file and directory under ``path``."""
    if not os.path.isdir(path):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_directory(root)


def temporary_path(path: str) -> str:
    """A name beside ``path`` that no other process uses: ``PATH.tmp-HOST-PID``."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def remove_dead_temporaries(path: str) -> None:
    """Remove this host's ``temporary_path`` names of ``path`` whose writer process is gone
    (a writer killed with SIGKILL leaves its temporary behind)."""
    host = socket.gethostname()
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        owner, _, pid = tmp[len(path) + len(".tmp-") :].rpartition("-")
        if owner == host and pid.isdigit() and not _process_alive(int(pid)):
            remove(tmp)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def publish(tmp: str, path: str, durable: bool = True) -> None:
    """Move the finished ``tmp`` (a file or a directory) to ``path`` atomically.

    A directory replaces an existing ``path`` only if that is an empty directory (rename's
    rule); a file replaces an existing file. ``durable=False`` skips the fsyncs of ``tmp``'s
    contents when the writer made them durable itself.
    """
    if durable:
        fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def remove(path: str) -> None:
    """Remove a file or directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def staged(path: str) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s contents to (a file, or a directory the caller
    creates); on success publish it, on any failure remove it and leave ``path`` untouched."""
    tmp = temporary_path(path)
    remove(tmp)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``: all or nothing."""
    with staged(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextlib.contextmanager
def staged_directory(output: str) -> Iterator[str]:
    """``staged`` for a new directory: yields it created and empty; refuses an ``output`` that
    exists, so nothing is ever overwritten."""
    if os.path.exists(output):
        raise FileExistsError(f"{os.path.abspath(output)} exists: remove it or choose another output")
    with staged(output) as tmp:
        os.makedirs(tmp)
        yield tmp
