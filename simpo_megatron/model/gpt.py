"""Build a megatron-core GPTModel for Llama-family models and Gemma-2 from the model section of the config.

Llama, Mistral and Qwen2 share one shape: RMSNorm, SwiGLU MLP, rotary position embeddings,
grouped-query attention, no linear biases (Qwen2 adds a QKV bias), untied embeddings
(Mistral: a sliding window). Gemma-2 adds, each from a model flag: a GeGLU MLP
with the tanh GELU, (1 + weight) RMSNorms, norms after attention and after the MLP
(sandwich norms), embeddings scaled by sqrt(hidden), ``query_pre_attn_scalar`` as the
softmax scale, soft-capped attention and output logits, and a sliding window on every
other layer. The layer pieces are local modules in the layer spec (model/layers.py,
model/attention.py); the two model-level ones are in ``GPTModel`` here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel as MegatronGPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from simpo_megatron.config import ModelConfig
from simpo_megatron.model.attention import SDPAttention
from simpo_megatron.model.fp8 import check_transformer_engine, fp8_config_kwargs
from simpo_megatron.model.layers import RMSNorm, RowParallelLinearWithPostNorm, softcap
from simpo_megatron.model.moe import RouterHooks, fix_router_gemm_without_te, freeze_routers, router_balance
from simpo_megatron.runtime import ParallelLayout, pipeline_communication_settings


@dataclass
class GPTConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the Gemma-2 fields it lacks (None/False: off)."""

    attn_logit_softcapping: float | None = None
    """Soft-cap of the scaled attention scores, before the mask (SDPAttention)."""
    final_logit_softcapping: float | None = None
    """Soft-cap of the output logits (``final_logit_transform``)."""
    scale_embeddings: bool = False
    """Multiply the word embeddings by sqrt(hidden_size), rounded to their dtype as HF does."""
    sandwich_norm: bool = False
    """Norm the attention and MLP outputs before the residual add (``post_layernorm``)."""


def final_logit_transform(config: TransformerConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The elementwise map from output-layer logits to the model's logits, or None (identity).

    Gemma-2's final soft-capping. Elementwise, so it applies to vocab-parallel logits (and to
    any chunk of them) before the log-softmax.
    """
    cap = getattr(config, "final_logit_softcapping", None)
    return None if cap is None else functools.partial(softcap, cap=cap)


class GPTModel(MegatronGPTModel):
    """megatron-core's GPTModel with the model-level Gemma-2 features of ``GPTConfig``
    (embeddings scaled by sqrt(hidden), ``final_logit_transform`` applied to the logits), whose
    last stage can return the final hidden states instead of the logits.

    With ``logprob_chunk_size > 0`` the output layer is skipped: the loss computes the
    log-probs from the ``[s, b, h]`` hidden states and :meth:`output_weight` in chunks
    (``simpo_megatron.logprobs.chunked_vocab_parallel_token_logps``), applying
    ``logits_transform`` to each chunk, so the logits of the whole micro-batch never exist.
    """

    # Tokens per chunk of the log-prob head (0: the output layer computes the logits).
    logprob_chunk_size: int = 0

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.final_logit_transform = final_logit_transform(config)

    @property
    def logits_transform(self):
        """The elementwise function of the logits applied before the softmax (None: identity)."""
        return self.final_logit_transform

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

    def _preprocess(self, input_ids, position_ids, decoder_input=None, **kwargs):
        embedded = decoder_input is None and self.pre_process
        output = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input, **kwargs)
        if embedded and getattr(self.config, "scale_embeddings", False):
            hidden = output[0]
            # Multiplying after the embedding's dropout / sequence-parallel scatter is the same.
            normalizer = torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype, device=hidden.device)
            output = (hidden * normalizer, *output[1:])
        return output

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, **kwargs):
        if labels is not None and self.final_logit_transform is not None:
            raise ValueError("GPTModel: labels with a final logit transform; compute the loss from the logits")
        output = super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels, **kwargs
        )
        if (
            self.post_process
            and labels is None
            and self.final_logit_transform is not None
            and not self.return_hidden_states
        ):
            output = self.final_logit_transform(output)
        return output


def params_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def transformer_config(cfg: ModelConfig, layout: ParallelLayout = ParallelLayout()) -> GPTConfig:
    """The megatron-core TransformerConfig of the model ``cfg`` describes, split as ``layout`` says."""
    dtype = params_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    return GPTConfig(
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
        layernorm_zero_centered_gamma=cfg.apply_layernorm_1p,
        gated_linear_unit=cfg.swiglu or cfg.geglu,
        activation_func=(
            F.silu if cfg.swiglu else functools.partial(F.gelu, approximate="tanh") if cfg.geglu else F.gelu
        ),
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        softmax_scale=cfg.softmax_scale,
        window_size=window,
        window_attn_skip_freq=cfg.window_attn_skip_freq,
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping,
        scale_embeddings=cfg.scale_embeddings,
        sandwich_norm=cfg.sandwich_norm,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        context_parallel_size=layout.context_parallel_size,
        cp_comm_type=layout.cp_comm_type,  # Transformer Engine's CP attention; the local one all-gathers
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
        bias_activation_fusion=on_gpu and cfg.swiglu,  # no fused kernel for the tanh GeGLU
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        recompute_modules=list(cfg.recompute_modules) or None,  # None: megatron-core's default, core_attn
        cuda_graph_scope=[],  # megatron-core 0.16.1's default, "full", is deprecated and warns
        **pipeline_communication_settings(layout),  # by the process group's backend
        **fp8_config_kwargs(cfg),
        **moe_config_kwargs(cfg, layout),
    )


def moe_config_kwargs(cfg: ModelConfig, layout: ParallelLayout) -> dict:
    """The TransformerConfig fields of a mixture-of-experts model (none for a dense one).

    Dropless routing (no capacity factor) with the softmax router: by default the softmax of
    the top-k logits, which is HF's softmax over all experts renormalized over the top k
    (Mixtral, Qwen3-MoE with norm_topk_prob); with ``moe_router_pre_softmax`` the top-k
    probabilities of the full softmax as they are. megatron-core's load-balancing loss is
    off: its per-layer form is not HF's (see ``model/moe.py``).
    """
    if cfg.num_experts is None:
        return {}
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.derived_ffn_hidden_size(),
        moe_router_topk=cfg.moe_router_topk,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        expert_model_parallel_size=layout.expert_model_parallel_size,
    )


def layer_spec(cfg: ModelConfig, sequence_parallel: bool = False) -> ModuleSpec:
    """The transformer layer spec: Transformer Engine layers, or local layers with SDPA attention
    (and, for Gemma-2, the local RMSNorm and the post-norm linears). With sequence parallelism
    the local layers' norms are the local RMSNorm: megatron-core's torch fallback refuses it.
    What each supports is checked by the config's validation."""
    if cfg.transformer_impl == "transformer_engine":
        check_transformer_engine(cfg)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_experts, moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm
        )
    spec = get_gpt_layer_local_spec(
        num_experts=cfg.num_experts, moe_grouped_gemm=False, normalization=cfg.normalization
    )
    layer = spec.submodules
    # The query and key norms (Qwen3) in fp32, as HF computes them.
    qk_norm = RMSNorm if cfg.qk_layernorm else layer.self_attention.submodules.q_layernorm
    attention = dataclasses.replace(
        layer.self_attention,
        submodules=dataclasses.replace(
            layer.self_attention.submodules, core_attention=SDPAttention, q_layernorm=qk_norm, k_layernorm=qk_norm
        ),
    )
    mlp = layer.mlp
    changes = {}
    if cfg.apply_layernorm_1p or cfg.sandwich_norm or sequence_parallel:
        changes.update(input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
    if cfg.sandwich_norm:
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules, linear_proj=RowParallelLinearWithPostNorm)
        )
        mlp = dataclasses.replace(
            mlp, submodules=dataclasses.replace(mlp.submodules, linear_fc2=RowParallelLinearWithPostNorm)
        )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(layer, self_attention=attention, mlp=mlp, **changes)
    )


def _block_spec(cfg: ModelConfig, config: TransformerConfig, spec: ModuleSpec, vp_stage: int | None):
    """The layer spec, or where the local layers' norms are the local RMSNorm ((1 + weight)
    norms, sequence parallelism) a block spec whose final norm is RMSNorm too."""
    local_norm = cfg.apply_layernorm_1p or config.sequence_parallel
    if not local_norm or cfg.transformer_impl == "transformer_engine":
        return spec
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=RMSNorm
    )


def build_model(cfg: ModelConfig, layout: ParallelLayout, padded_vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks (one, or one per virtual pipeline stage), unwrapped, on the device.

    ``cfg`` is the model section of a validated config; ``layout`` the parallel state it is built in.
    """
    config = transformer_config(cfg, layout)
    if cfg.num_experts is not None:
        fix_router_gemm_without_te()
    spec = layer_spec(cfg, config.sequence_parallel)
    vpp = layout.virtual_pipeline_model_parallel_size
    chunks = []
    # HF's load-balancing loss: one exchange of router statistics per rank, for all its chunks.
    balance = router_balance(config, cfg.moe_aux_loss_coeff, vpp or 1) if cfg.moe_aux_loss_coeff else None
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=_block_spec(cfg, config, spec, stage),
            vocab_size=padded_vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
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
        if cfg.freeze_router:
            freeze_routers(model)
        # Padding routed nowhere; the routers' statistics for the load-balancing loss.
        model.router_hooks = RouterHooks(model, balance) if cfg.num_experts else None
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
