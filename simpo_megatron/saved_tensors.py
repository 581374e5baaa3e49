"""Measure the activations autograd keeps for backward, on any device (the CPU included).

``SavedTensorMeter`` is a ``torch.autograd.graph.saved_tensors_hooks`` context: every tensor
an autograd node saves during the forward is counted once by its storage (views of one
buffer, and a tensor saved by two nodes, count once), parameters left out. ``kept_bytes`` is
then the memory the forward leaves alive for backward: what activation recompute reduces and
what the memory estimate's activation term predicts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages saved for backward inside the context, ``exclude``d ones
    (the parameters) left out."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {self._key(t) for t in exclude}
        self._storages: dict[tuple, int] = {}
        super().__init__(self._pack, lambda saved: saved)

    def __enter__(self) -> SavedTensorMeter:
        super().__enter__()
        return self

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.device, t.untyped_storage().data_ptr())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self._excluded and t.untyped_storage().data_ptr() != 0:
            self._storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def kept_bytes(self) -> int:
        return sum(self._storages.values())
