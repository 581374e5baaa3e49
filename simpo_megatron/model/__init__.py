"""Model construction: megatron-core GPTModel for Llama-family models and Gemma-2."""

from simpo_megatron.model.gpt import build_model, final_logit_transform, layer_spec, transformer_config

__all__ = ["build_model", "final_logit_transform", "layer_spec", "transformer_config"]
