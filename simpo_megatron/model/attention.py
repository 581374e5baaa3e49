"""Core attention on torch's ``scaled_dot_product_attention``, for the local layer spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor, same tensor layout)
that needs neither its CUDA global memory buffer nor fused softmax kernels: it runs on the
CPU, and on a GPU it dispatches to the flash / memory-efficient SDPA kernels. It also does
what megatron's local attention lacks for Gemma-2: logit soft-capping (then the scores are
computed explicitly, as Hugging Face's eager attention does) and the sliding window of
``config.window_size`` on the layers ``config.window_attn_skip_freq`` selects.

The forward is two pure functions: ``causal_window_mask`` (which keys each query may see:
causal, optionally windowed; None for plain causal), then ``core_attention`` (attention from
q, k, v, that boolean mask, the scale, softcap and dropout). Another mask (e.g. block-diagonal
for packed sequences) combines with the first by ``&`` before the second.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from simpo_megatron.model.context_parallel import context_parallel_attention
from simpo_megatron.model.layers import softcap as _softcap


def causal_window_mask(sq: int, sk: int, window: int | None, device) -> torch.Tensor | None:
    """Bool ``[sq, sk]`` mask, True where query i may attend key j: causal (queries aligned to
    the last keys) and, with ``window``, only the ``window`` most recent keys, itself included
    (Hugging Face's ``sliding_window``). None when that is plain causal attention."""
    if window is None or window >= sk:
        return None
    i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return (j <= i) & (i - j < window)


def core_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of ``q`` [b, heads, sq, d] over ``k``/``v`` [b, groups, sk, d] -> [b, heads, sq, d].

    ``mask`` (bool, True = attend; None = causal) broadcasts against [b, heads, sq, sk].
    ``softcap`` caps the scaled scores to ``softcap * tanh(s / softcap)`` before masking, in
    fp32 at least, as the softmax (Hugging Face's eager attention).
    """
    enable_gqa = k.shape[1] != q.shape[1]
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=enable_gqa
            )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
        )
    if enable_gqa:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
    scores = _softcap(scores * scale, softcap)
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


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
        if softmax_scale is None:
            softmax_scale = config.softmax_scale
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        # megatron's window_size is (left, right) keys beside the query: left + 1 keys in all.
        self.window = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            if config.window_size[1] != 0:
                raise ValueError(f"SDPAttention is causal: window_size {config.window_size} must end at 0")
            self.window = config.window_size[0] + 1

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
        dropout_p = self.dropout_p if self.training else 0.0
        if self.cp_group is not None:
            return context_parallel_attention(query, key, value, self.cp_group, self.softmax_scale, dropout_p)
        sq, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
        mask = causal_window_mask(sq, k.shape[2], self.window, q.device)
        kwargs = dict(scale=self.softmax_scale, mask=mask, softcap=self.softcap, dropout_p=dropout_p)
        if dropout_p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = core_attention(q, k, v, **kwargs)
        else:
            context = core_attention(q, k, v, **kwargs)
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)

    def packed_forward(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """Attention within each packed sequence only: ``query`` [t, np, hn], ``key``/``value``
        [t, ng, hn] (megatron-core's THD layout, RoPE already restarted per sequence by
        ``cu_seqlens``) -> context [t, 1, np*hn].

        Each sequence runs through :meth:`forward` on its own, so packing changes nothing in
        what one sequence's tokens attend to (same mask, same kernel as unpacked). Sequences
        are delimited by ``cu_seqlens_q_padded`` when given (their padding lies after their
        tokens, so causal attention keeps it out of them). With context parallelism the row
        holds this rank's chunks of every padded sequence (``thd_partition_indices``) and
        ``context_parallel_attention`` attends within each sequence over the CP group.
        """
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention packs the 'thd' format only, got {packed_seq_params.qkv_format!r}")
        padded_q, padded_kv = packed_seq_params.cu_seqlens_q_padded, packed_seq_params.cu_seqlens_kv_padded
        if (padded_q is None) != (padded_kv is None):
            raise ValueError("SDPAttention needs both cu_seqlens_q_padded and cu_seqlens_kv_padded, or neither")
        if padded_q is None:
            bounds, bounds_kv = packed_seq_params.cu_seqlens_q.tolist(), packed_seq_params.cu_seqlens_kv.tolist()
        else:
            bounds, bounds_kv = padded_q.tolist(), padded_kv.tolist()
        cp_size = 1 if self.cp_group is None else self.cp_group.size()
        if bounds_kv != bounds or bounds[-1] != query.shape[0] * cp_size:
            raise ValueError(
                "SDPAttention needs cu_seqlens_q == cu_seqlens_kv (padded ones when given) covering every token"
                + (" of the CP group" if cp_size > 1 else "")
            )
        if self.cp_group is not None:
            if padded_q is None:
                raise ValueError(
                    "packed sequences with context parallelism need cu_seqlens_q_padded (multiples of 2 x CP)"
                )
            dropout_p = self.dropout_p if self.training else 0.0
            return context_parallel_attention(
                query[:, None],
                key[:, None],
                value[:, None],
                self.cp_group,
                self.softmax_scale,
                dropout_p,
                cu_seqlens_padded=bounds,
            )
        parts = [
            self.forward(query[a:b, None], key[a:b, None], value[a:b, None], None)
            for a, b in zip(bounds[:-1], bounds[1:])
            if b > a
        ]
        return torch.cat(parts, dim=0)
