"""Durable file-system steps shared by every writer that must never leave a partial output."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


def fsync_directory(path: str) -> None:
    """Make renames inside ``path`` durable (a rename is only on disk once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: all or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def staged_directory(output: str) -> Iterator[str]:
    """A fresh ``OUTPUT.tmp`` to write a whole directory into, published as ``output`` by one
    rename on success (its files fsynced first) and removed on failure: all or nothing.

    Refuses an ``output`` that exists, so nothing is ever overwritten.
    """
    output = os.path.abspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output} exists: remove it or choose another output")
    tmp = output + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, output)
    fsync_directory(os.path.dirname(output))
