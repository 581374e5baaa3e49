"""Megatron global tensors in and out of models and dist checkpoints, on any TP/PP layout.

``load_into_model`` fills this rank's model chunks from global (unsharded) tensors, slicing
each the way ``model.sharded_state_dict()`` says (key, global shape, offsets; megatron's
fused QKV and [gate; up] layouts included), so nothing is converted per layout.
``read_checkpoint_tensors`` reads a dist checkpoint's global tensors without a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.utils import unwrap_model

from simpo_megatron.hf.errors import HFConversionError


def _sharded_tensors(chunk) -> Iterable[ShardedTensor]:
    """The ShardedTensors of a model chunk, factories (e.g. SwiGLU's fc1) expanded."""
    for item in nested_values(chunk.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            yield from (t for t in nested_values(item.build()) if isinstance(t, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            yield item


def load_into_model(chunks, get: Callable[[str, int | None], torch.Tensor]) -> None:
    """Copy global tensors into this rank's parameters (of model chunks, DDP-wrapped or not),
    each ShardedTensor's slice of them.

    ``get(key, None)`` is the global tensor of a megatron checkpoint key; for a layer-stacked
    key (megatron's ``decoder.layers.*``, one leading axis per layer) ``get(key, layer)`` is
    that layer's global tensor, so a pipeline stage reads only its own layers (for an expert
    key, all experts of the layer stacked: ``[E, ...]``). The data of a
    ShardedTensor is a view of the parameter, so the copy fills the model.
    """
    with torch.no_grad():
        for chunk in unwrap_model(list(chunks)):
            for sh in _sharded_tensors(chunk):
                index = sh.global_slice()
                layer = None
                if sh.prepend_axis_num:
                    # 1: layers stacked; 2: layers, then experts (part of the layer's tensor)
                    if sh.prepend_axis_num not in (1, 2):
                        raise HFConversionError(f"{sh.key}: {sh.prepend_axis_num} stacked axes (expected 1 or 2)")
                    layer, index = index[0], index[1:]
                try:
                    full = get(sh.key, layer)
                except KeyError:
                    raise HFConversionError(f"no tensor for the model's {sh.key}") from None
                shape = tuple(sh.global_shape[1 if sh.prepend_axis_num else 0 :])
                if tuple(full.shape) != shape:
                    raise HFConversionError(f"tensor {sh.key}: global shape {tuple(full.shape)}, the model has {shape}")
                sh.data.copy_(full[index])


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """The existing process group, or a one-process gloo group for the duration (the
    checkpoint reader asks for a rank; no model-parallel state is set up)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def read_checkpoint_tensors(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint as one global tensor per key, whatever layout saved it."""
    with _process_group():
        return dist_checkpointing.load_plain_tensors(ckpt_dir)
