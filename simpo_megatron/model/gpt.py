"""Build a megatron-core GPTModel for Llama-family models from a SimPOConfig.

Llama, Mistral and Qwen2 share one shape: RMSNorm, SwiGLU MLP, rotary position embeddings,
grouped-query attention, no linear biases (Qwen2 adds a QKV bias), untied embeddings.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from simpo_megatron.config import ConfigError, SimPOConfig
from simpo_megatron.model.attention import SDPAttention
from simpo_megatron.model.fp8 import check_transformer_engine, fp8_config_kwargs


def params_dtype(cfg: SimPOConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def transformer_config(cfg: SimPOConfig) -> TransformerConfig:
    """The megatron-core TransformerConfig of the model that ``cfg`` describes."""
    dtype = params_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.model.derived_ffn_hidden_size(),
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        kv_channels=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size(),
        sequence_parallel=cfg.sequence_parallel,
        context_parallel_size=cfg.context_parallel_size,
        cp_comm_type=cfg.cp_comm_type,  # Transformer Engine's CP attention; the local one all-gathers
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        autocast_dtype=dtype,
        # The loss function returns (sum over pairs, number of pairs, metrics): megatron-core
        # then divides the summed gradients by the global number of pairs, which makes the
        # loss an exact mean over the global batch whatever the micro-batch / DP split.
        calculate_per_token_loss=True,
        attention_softmax_in_fp32=True,
        # Fused kernels exist only on the GPU.
        bias_activation_fusion=on_gpu and cfg.swiglu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # Frees a stage's output once sent: safe with NCCL (stream-ordered), not with gloo,
        # whose asynchronous sends may still be reading the tensor.
        deallocate_pipeline_outputs=on_gpu,
        # Batched isend/irecv relies on NCCL's group semantics. Gloo matches messages between
        # two ranks in posting order, and the batched order (send_prev before send_next) does
        # not match the receiver's when both neighbors are the same rank (interleaved PP=2):
        # activations and gradients would swap. The unbatched ops are ordered to match.
        batch_p2p_comm=on_gpu,
        **fp8_config_kwargs(cfg),
    )


def layer_spec(cfg: SimPOConfig) -> ModuleSpec:
    """The transformer layer spec: Transformer Engine layers, or local layers with SDPA attention."""
    if cfg.transformer_impl == "transformer_engine":
        check_transformer_engine(cfg)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    if cfg.sequence_parallel:
        raise ConfigError(
            "--sequence-parallel needs --transformer-impl transformer_engine: megatron-core's "
            "local layers fall back to torch norms without Apex, which do not support it"
        )
    spec = get_gpt_layer_local_spec(normalization=cfg.normalization)
    attention = spec.submodules.self_attention
    submodules = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    attention = dataclasses.replace(attention, submodules=submodules)
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention)
    )


def build_model(cfg: SimPOConfig, padded_vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks (one, or one per virtual pipeline stage), unwrapped, on the device."""
    config = transformer_config(cfg)
    spec = layer_spec(cfg)
    vpp = cfg.virtual_pipeline_model_parallel_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size,
            max_sequence_length=cfg.max_position_embeddings or cfg.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            rope_scaling=cfg.use_rope_scaling,
            rope_scaling_factor=cfg.rope_scaling_factor,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
