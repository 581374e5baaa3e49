"""Mixture-of-experts pieces around megatron-core's MoE layer.

- ``fix_router_gemm_without_te``: megatron-core 0.16.1's router imports Transformer Engine's
  GEMM in a ``try`` and, without TE, leaves the name undefined instead of None; the router
  then fails with a NameError. Setting it to None selects its own torch fallback.
- ``freeze_routers``: keep the routers' weights out of training (``--freeze-router``).
- ``load_balancing_loss``: HF's router load-balancing loss (Mixtral, Qwen3-MoE), a pure function.

HF's loss and megatron-core's ``switch_load_balancing_loss_func`` differ. HF concatenates the
router logits of all layers and takes ``E * sum_e f_e * P_e``, where ``f_e`` is the fraction of
(token, top-k slot) choices of expert e and ``P_e`` its mean softmax probability, both averaged
over the real tokens of *all layers together*; megatron-core computes ``E / k * sum_e f_e * P_e``
per layer and sums the layers. With one layer they differ by the factor k; with several, HF's
is a product of layer averages, megatron's a sum of per-layer products. So megatron-core's
loss is left off and this one is what a run would add (not wired into training yet).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter


def fix_router_gemm_without_te() -> None:
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def routers(model: torch.nn.Module) -> list[TopKRouter]:
    """The MoE routers of a model chunk, in layer order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def freeze_routers(model: torch.nn.Module) -> None:
    """Turn off the gradients of every router weight (before the DDP wrapper and optimizer see them)."""
    for router in routers(model):
        for p in router.parameters():
            p.requires_grad_(False)


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, topk: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """HF's ``load_balancing_loss_func``: ``router_logits`` ``[T, E]`` per layer, ``token_mask``
    ``[T]`` (1: a real token, 0: padding) the same for every layer; the loss is unweighted."""
    logits = torch.cat(router_logits)
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.nn.functional.one_hot(probs.topk(topk, dim=-1).indices, num_experts).float()  # [L*T, k, E]
    if token_mask is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    else:
        weights = token_mask.float().repeat(len(router_logits))
    total = weights.sum()
    fraction = (chosen * weights[:, None, None]).sum(0) / total  # [k, E]
    mean_prob = (probs * weights[:, None]).sum(0) / total  # [E]
    return (fraction * mean_prob).sum() * num_experts
