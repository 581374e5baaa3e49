"""Core attention on torch's ``scaled_dot_product_attention``, for the local layer spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor, same tensor layout)
that needs neither its CUDA global memory buffer nor fused softmax kernels: it runs on the
CPU, and on a GPU it dispatches to the flash / memory-efficient SDPA kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


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
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
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
        """``query`` [sq, b, np, hn], ``key``/``value`` [sk, b, ng, hn] -> context [sq, b, np*hn].

        Packed sequences (THD, ``packed_seq_params``): see :meth:`packed_forward`.
        """
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        if packed_seq_params is not None:
            return self.packed_forward(query, key, value, packed_seq_params)
        sq, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
        dropout_p = self.dropout_p if self.training else 0.0
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

    def packed_forward(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """Attention within each packed sequence only: ``query`` [t, np, hn], ``key``/``value``
        [t, ng, hn] (megatron-core's THD layout, RoPE already restarted per sequence by
        ``cu_seqlens``) -> context [t, 1, np*hn].

        Each sequence runs through :meth:`forward` on its own, so packing changes nothing in
        what one sequence's tokens attend to (same mask, same kernel as unpacked).
        """
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention packs the 'thd' format only, got {packed_seq_params.qkv_format!r}")
        if packed_seq_params.cu_seqlens_q_padded is not None or packed_seq_params.cu_seqlens_kv_padded is not None:
            raise ValueError("SDPAttention does not support padded cu_seqlens")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        if packed_seq_params.cu_seqlens_kv.tolist() != bounds or bounds[-1] != query.shape[0]:
            raise ValueError("SDPAttention needs cu_seqlens_q == cu_seqlens_kv covering every token")
        parts = [
            self.forward(query[a:b, None], key[a:b, None], value[a:b, None], None)
            for a, b in zip(bounds[:-1], bounds[1:])
            if b > a
        ]
        return torch.cat(parts, dim=0)
