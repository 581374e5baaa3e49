"""Core attention on torch's ``scaled_dot_product_attention``, for the local layer spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor, same tensor layout)
that needs neither its CUDA global memory buffer nor fused softmax kernels: it runs on the
CPU, and on a GPU it dispatches to the flash / memory-efficient SDPA kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from simpo_megatron.model.context_parallel import context_parallel_attention


class SDPAttention(MegatronModule):
    """Causal multi-head / grouped-query attention over this rank's heads."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        # Context parallelism: this rank holds two chunks of each sequence (context_parallel.py).
        self.cp_group = None
        if config.context_parallel_size > 1:
            cp = getattr(pg_collection, "cp", None)
            self.cp_group = cp if cp is not None else parallel_state.get_context_parallel_group()
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """``query`` [sq, b, np, hn], ``key``/``value`` [sk, b, ng, hn] -> context [sq, b, np*hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        dropout_p = self.dropout_p if self.training else 0.0
        if self.cp_group is not None:
            return context_parallel_attention(query, key, value, self.cp_group, self.softmax_scale, dropout_p)
        sq, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
        enable_gqa = k.shape[1] != heads
        if dropout_p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale,
                    enable_gqa=enable_gqa,
                )
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=enable_gqa
            )
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)
