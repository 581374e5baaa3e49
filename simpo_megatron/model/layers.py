"""Local layer pieces that megatron-core 0.16.1 lacks, used through the layer spec (Gemma-2).

- ``RMSNorm``: RMSNorm computed in fp32 as Hugging Face does, scaling by ``1 + weight`` when
  the config says ``layernorm_zero_centered_gamma`` (Megatron-LM's --apply-layernorm-1p);
  torch's norm, megatron's fallback without Apex, refuses that option.
- ``RowParallelLinearWithPostNorm``: a row-parallel linear whose output is normed before the
  residual add: Gemma-2's post-attention and post-MLP norms, as ``linear_proj`` and
  ``linear_fc2`` (the ``post_layernorm`` of Megatron-Bridge's Gemma-2 layers).
- ``softcap``: ``cap * tanh(x / cap)``, the soft-capping of attention and output logits.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``: smooth clipping to (-cap, cap); elementwise, so it applies to
    vocab-parallel logits shard by shard."""
    return torch.tanh(x / cap) * cap


class RMSNorm(torch.nn.Module):
    """``x / rms(x) * w`` (or ``* (1 + w)`` with zero-centred gamma), in fp32, cast back to x's dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.eps = eps
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float()
        return (y * (1.0 + weight if self.zero_centered_gamma else weight)).type_as(x)


class RowParallelLinearWithPostNorm(RowParallelLinear):
    """``norm(x @ W^T + b)``: returns the normed output and no separate bias."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = RMSNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if bias is not None:
            output = output + bias
        return self.post_layernorm(output), None
