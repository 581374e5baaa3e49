"""Model construction: megatron-core GPTModel for Llama-family models."""

from simpo_megatron.model.gpt import build_model, layer_spec, transformer_config

__all__ = ["build_model", "layer_spec", "transformer_config"]
