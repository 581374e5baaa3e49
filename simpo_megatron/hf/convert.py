"""HF directory <-> Megatron model / checkpoint, built on the adapter and the sharded loader.

- ``load_hf_weights``: the HF model in a directory, loaded straight into this rank's model
  chunks on any TP/PP layout (how ``--load HF_DIR`` starts a run); no conversion on disk.
- ``export_checkpoint``: a dist checkpoint (any TP/PP/VPP layout) -> an HF directory, read as
  global tensors, with no model and no model-parallel world.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import torch
from megatron.core import dist_checkpointing

from simpo_megatron.checkpoint_format import resolve_checkpoint
from simpo_megatron.config import SimPOConfig
from simpo_megatron.fsutil import staged_directory
from simpo_megatron.hf.adapter import (
    HFConversionError,
    check_hf_tensors,
    hf_config_to_overrides,
    hf_global_to_megatron,
    hf_layer_to_megatron,
    megatron_to_hf,
    model_config,
    overrides_to_hf_config,
)
from simpo_megatron.hf.files import (
    TOKENIZER_FILES,
    SafetensorsDir,
    copy_files,
    hf_config_dtype,
    parse_dtype,
    parse_size,
    read_hf_config,
    save_safetensors,
)
from simpo_megatron.hf.sharded import load_into_model, read_checkpoint_tensors

HF_CONFIG_DIR = "hf_config"  # config.json and tokenizer files of the source model, beside a checkpoint


def hf_model_overrides(hf_dir: str, seq_length: int | None = None) -> dict:
    """The SimPOConfig model fields of the HF model in ``hf_dir`` (see hf_config_to_overrides)."""
    return hf_config_to_overrides(read_hf_config(hf_dir), seq_length)


def load_hf_weights(hf_dir: str, chunks, cfg: SimPOConfig) -> None:
    """Fill this rank's model chunks (any TP/PP/VPP layout) with the weights in ``hf_dir``.

    Each rank reads, memory-mapped, only the tensors of its own layers (all of a layer, then
    keeps its tensor-parallel slice), one layer at a time; no file is written. ``cfg`` must
    carry the model fields of ``hf_dir``.
    """
    hf = SafetensorsDir(hf_dir)
    check_hf_tensors(hf.shapes, cfg)
    first = chunks[0].module if hasattr(chunks[0], "module") else chunks[0]
    padded_vocab_size = first.vocab_size

    @functools.lru_cache(maxsize=1)
    def layer_tensors(layer: int) -> dict[str, torch.Tensor]:
        return hf_layer_to_megatron(hf, cfg, layer)

    def get(key: str, layer: int | None) -> torch.Tensor:
        if layer is not None:
            return layer_tensors(layer)[key]
        return hf_global_to_megatron(hf, cfg, padded_vocab_size, keys=(key,))[key]

    load_into_model(chunks, get)


def save_hf_config(hf_dir: str, root: str) -> None:
    """Keep config.json and the tokenizer files of ``hf_dir`` in ``root/hf_config`` (export's default)."""
    target = os.path.join(root, HF_CONFIG_DIR)
    if not os.path.isdir(target):
        with staged_directory(target) as tmp:
            copy_files(hf_dir, tmp, ("config.json", *TOKENIZER_FILES))


def export_checkpoint(
    load: str,
    output: str,
    *,
    hf_config_dir: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
) -> str:
    """Convert the newest checkpoint under ``load`` (any TP/PP/VPP layout) into an HF directory.

    ``hf_config_dir`` (default: ``LOAD/hf_config``) supplies the original config.json, whose
    other entries are kept, and the tokenizer files, which are copied. ``dtype`` defaults to
    that config's dtype, else float32. Returns ``output``, written atomically.
    """
    ckpt = resolve_checkpoint(load)
    common = dist_checkpointing.load_common_state_dict(ckpt)
    if "config" not in common:
        raise HFConversionError(f"{ckpt} records no model config (save it with save_checkpoint(config_dict=...))")
    cfg = model_config(common["config"])
    if hf_config_dir is None and os.path.isdir(os.path.join(load, HF_CONFIG_DIR)):
        hf_config_dir = os.path.join(load, HF_CONFIG_DIR)
    base = read_hf_config(hf_config_dir) if hf_config_dir else None
    if base is None:
        warnings.warn(f"{load}: no HF config given (--hf-config): writing a fresh config.json and no tokenizer files")
    dtype_name = dtype or (base and hf_config_dtype(base)) or "float32"
    hf_config = overrides_to_hf_config(cfg, base, dtype_name)
    max_shard_bytes = parse_size(max_shard_size)
    try:
        with staged_directory(output) as tmp:
            tensors = megatron_to_hf(read_checkpoint_tensors(ckpt), cfg, parse_dtype(dtype_name))
            save_safetensors(tensors, tmp, max_shard_bytes)
            with open(os.path.join(tmp, "config.json"), "w") as fh:
                json.dump(hf_config, fh, indent=2)
            if hf_config_dir:
                copy_files(hf_config_dir, tmp, TOKENIZER_FILES)
    except FileExistsError as e:
        raise HFConversionError(str(e)) from None
    return os.path.abspath(output)
