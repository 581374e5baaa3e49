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


class SimPOGPTModel(GPTModel):
    """GPTModel whose last stage can return the final hidden states instead of the logits.

    With ``return_hidden_states`` the output layer is skipped: the loss computes the
    log-probs from ``[s, b, h]`` hidden states and :meth:`output_weight` in chunks
    (``simpo_megatron.logprobs.chunked_vocab_parallel_token_logps``), so the logits of the
    whole micro-batch never exist.
    """

    # Tokens per chunk of the log-prob head (0: the output layer computes the logits).
    logprob_chunk_size: int = 0
    # An elementwise function of the fp32 logits applied before the softmax (None: identity).
    logits_transform = None

    @property
    def return_hidden_states(self) -> bool:
        return self.logprob_chunk_size > 0

    def output_weight(self) -> torch.Tensor:
        """This rank's ``[V/tp, h]`` output weight (the word embeddings when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self.post_process and self.return_hidden_states:
            if self.config.mtp_num_layers is not None:
                raise ValueError("--logprob-chunk-size does not support multi-token prediction")
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)


def params_dtype(cfg: SimPOConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def transformer_config(cfg: SimPOConfig) -> TransformerConfig:
    """The megatron-core TransformerConfig of the model that ``cfg`` describes."""
    dtype = params_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.derived_ffn_hidden_size(),
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
        # Micro-batches are padded to their own longest sequence: stages exchange shapes first.
        # Not for the interleaved schedule on gloo: its shape exchange can deadlock there (seen
        # with 2 micro-batches at PP=2), so the trainer gives all micro-batches of a step one
        # shape and passes it to the schedule instead.
        variable_seq_lengths=cfg.pipeline_model_parallel_size > 1
        and (on_gpu or cfg.virtual_pipeline_model_parallel_size() is None),
        # Unused by dense models, but the default ("allgather") refuses variable_seq_lengths.
        moe_token_dispatcher_type="alltoall",
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
        model = SimPOGPTModel(
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
        model.logprob_chunk_size = cfg.logprob_chunk_size
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
