"""Mixture-of-experts pieces around megatron-core's MoE layer.

- ``fix_router_gemm_without_te``: megatron-core 0.16.1's router imports Transformer Engine's
  GEMM in a ``try`` and, without TE, leaves the name undefined instead of None; the router
  then fails with a NameError. Setting it to None selects its own torch fallback.
- ``freeze_routers``: keep the routers' weights out of training (``--freeze-router``).
- ``RouterHooks``: padding routed to no expert; each router's logits recorded for the loss below.
- ``load_balancing_loss``: HF's router load-balancing loss (Mixtral, Qwen3-MoE), a pure function;
  ``load_balancing_loss_over_group`` the same when a micro-batch's tokens are split over ranks.

HF's loss and megatron-core's ``switch_load_balancing_loss_func`` differ. HF concatenates the
router logits of all layers and takes ``E * sum_e f_e * P_e``, where ``f_e`` is the fraction of
(token, top-k slot) choices of expert e and ``P_e`` its mean softmax probability, both averaged
over the real tokens of *all layers together*; megatron-core computes ``E / k * sum_e f_e * P_e``
per layer and sums the layers. With one layer they differ by the factor k; with several, HF's
is a product of layer averages, megatron's a sum of per-layer products. So megatron-core's
loss is left off and this one is added to the preference loss (``--moe-aux-loss-coeff``).
Because HF's form couples every layer's routing, it needs all routers of the model on one
pipeline stage, and their logits with autograd (no recompute of the MoE layers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


class RouterHooks:
    """Hooks on every router of a model chunk, installed once at build time (each router's
    ``routing`` is wrapped).

    - Padding goes to no expert: given megatron-core's ``padding_mask`` (True for padding; the
      model's forward passes it down, through recompute too), a padding token's routing-map row
      and probabilities are zeroed, so the dispatcher sends it nowhere and its MoE output is 0
      (megatron-core's own uses of the mask, for its auxiliary losses, are off here).
    - Inside ``recording()`` every router's logits ``[s, b, E]`` and real-token mask (in the
      same token order) are kept, for the load-balancing loss of weight ``coeff``.
    """

    def __init__(self, model: torch.nn.Module, coeff: float):
        self.coeff = coeff
        self._records: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        for router in routers(model):
            router.routing = self._hooked(router.routing)

    def _hooked(self, routing):
        def routing_without_padding(logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
            probs, routing_map = routing(logits)
            real = None if padding_mask is None else ~_local_rows(padding_mask, logits.shape[0]).reshape(-1, 1)
            if self._records is not None:
                self._records.append((logits, None if real is None else real.reshape(-1)))
            if real is None:
                return probs, routing_map
            return probs * real, routing_map & real

        return routing_without_padding

    @contextmanager
    def recording(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """The list of ``(logits, real-token mask)`` that the routers fill, in layer order,
        during the forward inside."""
        self._records = records = []
        try:
            yield records
        finally:
            self._records = None


def _local_rows(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """``mask`` ``[s, b]`` cut to this tensor-parallel rank's ``rows`` of ``s`` when it is whole:
    megatron-core 0.16.1 scatters the mask for sequence parallelism on the first pipeline stage only."""
    if mask.shape[0] == rows:
        return mask
    from megatron.core import parallel_state

    return mask.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=0)[
        parallel_state.get_tensor_model_parallel_rank()
    ]


def load_balancing_statistics(
    router_logits: list[torch.Tensor], num_experts: int, topk: int, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed over the layers and the real tokens: how often each expert is among the top k
    (``[E]``, no gradient), its softmax probability (``[E]``), and the number of (layer, token)
    rows. ``router_logits`` ``[T, E]`` (or ``[s, b, E]``, flattened) per layer; ``token_mask``
    ``[T]`` in the same token order, 1 for a real token, 0 for padding."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sums = torch.zeros_like(counts)
    rows = torch.zeros((), dtype=torch.float32, device=counts.device)
    for logits in router_logits:
        probs = torch.softmax(logits.reshape(-1, num_experts).float(), dim=-1)
        weights = torch.ones(probs.shape[0], device=probs.device) if token_mask is None else token_mask.float()
        chosen = probs.detach().topk(topk, dim=-1).indices
        counts = counts.scatter_add(0, chosen.reshape(-1), weights.repeat_interleave(topk))
        prob_sums = prob_sums + (probs * weights[:, None]).sum(0)
        rows = rows + weights.sum()
    return counts, prob_sums, rows


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, topk: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """HF's ``load_balancing_loss_func``: ``E * sum_e f_e * P_e`` over the real tokens of all
    layers (see ``load_balancing_statistics`` for the arguments); the loss is unweighted."""
    counts, prob_sums, rows = load_balancing_statistics(router_logits, num_experts, topk, token_mask)
    return num_experts * (counts * prob_sums).sum() / rows.clamp(min=1.0) ** 2


def load_balancing_loss_over_group(
    router_logits: list[torch.Tensor],
    num_experts: int,
    topk: int,
    token_mask: torch.Tensor | None = None,
    group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """``load_balancing_loss`` of a micro-batch whose tokens are split over the ranks of ``group``
    (context parallelism, sequence parallelism): the statistics are all-reduced over it.

    Every rank returns the whole micro-batch's value; its gradient flows through this rank's own
    tokens only, so the ranks' gradients add up to the loss's (as they do for the log-probs).
    """
    counts, prob_sums, rows = load_balancing_statistics(router_logits, num_experts, topk, token_mask)
    totals = torch.cat([counts, prob_sums.detach(), rows[None]])
    if group is not None and group.size() > 1:
        torch.distributed.all_reduce(totals, group=group)
    counts, all_prob_sums, rows = totals[:num_experts], totals[num_experts:-1], totals[-1].clamp(min=1.0)
    local = num_experts * (counts * prob_sums).sum() / rows**2
    whole = num_experts * (counts * all_prob_sums).sum() / rows**2
    return local + (whole - local).detach()
