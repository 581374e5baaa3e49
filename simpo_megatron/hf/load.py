"""An HF model directory as the start of a run (``--load HF_DIR``): no conversion on disk.

- ``hf_model_overrides``: the model settings of its config.json.
- ``load_hf_weights``: its weights, loaded straight into this rank's model chunks on any
  TP/PP/VPP layout.
- ``save_hf_config``: its config.json and tokenizer files, kept beside the run's checkpoints
  (where export finds them).
"""

from __future__ import annotations

import functools
import os

import torch
from megatron.core.utils import unwrap_model

from simpo_megatron.config import SimPOConfig
from simpo_megatron.fsutil import staged_directory
from simpo_megatron.hf.config_mapping import hf_config_to_overrides
from simpo_megatron.hf.files import TOKENIZER_FILES, SafetensorsDir, copy_files, read_hf_config
from simpo_megatron.hf.sharded import load_into_model
from simpo_megatron.hf.tensor_mapping import check_hf_tensors, hf_global_to_megatron, hf_layer_to_megatron

HF_CONFIG_DIR = "hf_config"  # config.json and tokenizer files of the source model, beside a checkpoint


def hf_model_overrides(hf_dir: str, seq_length: int | None = None) -> dict:
    """The SimPOConfig model fields of the HF model in ``hf_dir`` (see hf_config_to_overrides)."""
    return hf_config_to_overrides(read_hf_config(hf_dir), seq_length)


def load_hf_weights(hf_dir: str, chunks, cfg: SimPOConfig) -> None:
    """Fill this rank's model chunks (any TP/PP/VPP layout, wrapped or not) with the weights in ``hf_dir``.

    Each rank reads, memory-mapped, only the tensors of its own layers (all of a layer, then
    keeps its tensor-parallel slice), one layer at a time; no file is written. ``cfg`` must
    carry the model fields of ``hf_dir``.
    """
    model = cfg.model
    hf = SafetensorsDir(hf_dir)
    check_hf_tensors(hf.shapes, model)
    padded_vocab_size = unwrap_model(chunks[0]).vocab_size

    @functools.lru_cache(maxsize=1)
    def layer_tensors(layer: int) -> dict[str, torch.Tensor]:
        return hf_layer_to_megatron(hf, model, layer)

    def get(key: str, layer: int | None) -> torch.Tensor:
        if layer is not None:
            return layer_tensors(layer)[key]
        return hf_global_to_megatron(hf, model, padded_vocab_size, keys=(key,))[key]

    load_into_model(chunks, get)


def save_hf_config(hf_dir: str, root: str) -> None:
    """Keep config.json and the tokenizer files of ``hf_dir`` in ``root/hf_config`` (export's default)."""
    target = os.path.join(root, HF_CONFIG_DIR)
    if not os.path.isdir(target):
        with staged_directory(target) as tmp:
            copy_files(hf_dir, tmp, ("config.json", *TOKENIZER_FILES))
