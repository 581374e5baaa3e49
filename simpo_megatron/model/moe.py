"""Mixture-of-experts pieces around megatron-core's MoE layer.

- ``fix_router_gemm_without_te``: megatron-core 0.16.1's router imports Transformer Engine's
  GEMM in a ``try`` and, without TE, leaves the name undefined instead of None; the router
  then fails with a NameError. Setting it to None selects its own torch fallback.
- ``freeze_routers``: keep the routers' weights out of training (``--freeze-router``).
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
