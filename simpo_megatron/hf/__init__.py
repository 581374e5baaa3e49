"""Hugging Face interop below model/ and training/: a pure state-dict adapter (adapter.py),
HF directory I/O (files.py), global tensors in and out of sharded models and dist
checkpoints (sharded.py), and the conversions built on them (convert.py)."""

from simpo_megatron.hf.adapter import HFConversionError, hf_config_to_overrides
from simpo_megatron.hf.convert import export_checkpoint, hf_model_overrides, load_hf_weights, save_hf_config
from simpo_megatron.hf.files import is_hf_checkpoint

__all__ = [
    "HFConversionError", "export_checkpoint", "hf_config_to_overrides", "hf_model_overrides",
    "is_hf_checkpoint", "load_hf_weights", "save_hf_config",
]
