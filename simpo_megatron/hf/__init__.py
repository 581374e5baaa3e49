"""Hugging Face interop below model/ and training/.

- ``config_mapping``: config.json <-> the model section of a config (``hf_config_to_overrides``,
  ``to_hf_config``, ``hf_model_type``), and the model's shape as a checkpoint records it.
- ``tensor_mapping``: HF tensor names and layouts <-> megatron-core's global checkpoint tensors
  (fused QKV per query group, fc1 = [gate; up], padded vocabulary), with shape checks.
- ``files``: HF directory I/O (config.json, safetensors, tokenizer files).
- ``sharded``: global tensors into sharded model chunks, and out of dist checkpoints.
- ``load``: an HF directory as the start of a run (``--load HF_DIR``).

Checkpoint conversion on disk, both ways, is ``simpo_megatron.training.hf_checkpoint``: its
import builds the model and writes a training checkpoint.
"""

from simpo_megatron.hf.config_mapping import hf_config_to_overrides, to_hf_config
from simpo_megatron.hf.errors import HFConversionError
from simpo_megatron.hf.files import is_hf_checkpoint
from simpo_megatron.hf.load import HF_CONFIG_DIR, hf_model_overrides, load_hf_weights, save_hf_config

__all__ = [
    "HF_CONFIG_DIR",
    "HFConversionError",
    "hf_config_to_overrides",
    "hf_model_overrides",
    "is_hf_checkpoint",
    "load_hf_weights",
    "save_hf_config",
    "to_hf_config",
]
