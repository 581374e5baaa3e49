"""Mixture-of-experts pieces around megatron-core's MoE layer.

- ``fix_router_gemm_without_te``: megatron-core 0.16.1's router imports Transformer Engine's
  GEMM in a ``try`` and, without TE, leaves the name undefined instead of None; the router
  then fails with a NameError. Setting it to None selects its own torch fallback.
- ``freeze_routers``: keep the routers' weights out of training (``--freeze-router``).
- ``RouterHooks``: padding routed to no expert; each router's statistics recorded for the loss below.
- ``load_balancing_loss``: HF's router load-balancing loss (Mixtral, Qwen3-MoE), a pure function;
  ``RouterBalance`` the same in training, where a micro-batch's layers and tokens are split over ranks.

HF's loss and megatron-core's ``switch_load_balancing_loss_func`` differ. HF concatenates the
router logits of all layers and takes ``E * sum_e f_e * P_e``, where ``f_e`` is the fraction of
(token, top-k slot) choices of expert e and ``P_e`` its mean softmax probability, both averaged
over the real tokens of *all layers together*; megatron-core computes ``E / k * sum_e f_e * P_e``
per layer and sums the layers. With one layer they differ by the factor k; with several, HF's
is a product of layer averages, megatron's a sum of per-layer products. So megatron-core's
loss is left off and this one is added to the preference loss (``--moe-aux-loss-coeff``).

HF's form couples every layer's routing: the gradient of layer l's probabilities is
``E x f / rows``, with the expert fractions ``f`` of *all* layers, which under pipeline
parallelism are only known once the last stage has run. So each layer's gradient is tied to its
router's output in forward and computed in backward (``_BalanceGradient``), when every stage's
statistics of the micro-batch have arrived; the value is added to the last stage's loss for
reporting. This is also what lets recomputed MoE layers take part.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
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
    - Inside ``recording()`` each router adds its layer's statistics of the real tokens to the
      micro-batch's ``MicroBatchBalance`` and, when training, ties the load-balancing loss's
      gradient to its probabilities (``_BalanceGradient``). A layer under activation recompute
      runs its first forward without autograd: it records there and ties the gradient when
      backward re-runs it.
    """

    def __init__(self, model: torch.nn.Module, balance: RouterBalance | None = None):
        self.balance = balance
        self._recording: _Recording | None = None
        self._forwards = 0  # recorded forwards of this chunk so far: the micro-batch's ordinal
        for router in routers(model):
            router.routing = self._hooked(router, router.routing)

    def _hooked(self, router: TopKRouter, routing):
        rerun: deque[MicroBatchBalance] = deque()  # micro-batches whose recompute is still to come

        def routing_without_padding(logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
            probs, routing_map = routing(logits)
            real = None if padding_mask is None else ~_local_rows(padding_mask, logits.shape[0]).reshape(-1, 1)
            if real is not None:
                probs, routing_map = probs * real, routing_map & real
            balance, prob_sums = None, None  # the gradient to tie: whose, and to what
            if self._recording is not None:
                stats = layer_statistics(logits, self.balance.num_experts, self.balance.topk, real)
                self._recording.add(stats)
                if torch.is_grad_enabled():
                    balance, prob_sums = self._recording.balance, stats[1]
                elif router.training:  # the first forward of a recomputed layer
                    rerun.append(self._recording.balance)
            elif rerun and torch.is_grad_enabled():  # that layer re-run in backward
                balance = rerun.popleft()
                prob_sums = layer_statistics(logits, balance.num_experts, balance.topk, real)[1]
            if balance is not None:
                probs = _BalanceGradient.apply(probs, prob_sums, balance)
            return probs, routing_map

        return routing_without_padding

    @contextmanager
    def recording(self, real_pairs: int) -> Iterator[MicroBatchBalance]:
        """The load-balancing statistics of the micro-batch (of ``real_pairs`` real pairs) whose
        forward runs inside, whole (every layer, every token) once every rank holding part of it
        has recorded its part."""
        balance = self.balance.micro_batch(self._forwards, real_pairs)
        self._forwards += 1
        self._recording = recording = _Recording(balance)
        try:
            yield balance
        finally:
            self._recording = None
        if recording.totals is None:
            raise RuntimeError("no router ran in this model chunk's forward: nothing to send the other stages")
        self.balance.contribute(balance, recording.totals)


class _Recording:
    """One chunk's statistics of one micro-batch, summed over its layers."""

    def __init__(self, balance: MicroBatchBalance):
        self.balance = balance
        self.totals: torch.Tensor | None = None  # [counts (E), probability sums (E), rows]

    def add(self, stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        counts, prob_sums, rows = stats
        layer = torch.cat([counts, prob_sums.detach(), rows[None]])
        self.totals = layer if self.totals is None else self.totals + layer


class MicroBatchBalance:
    """One micro-batch's router statistics over all its layers and real tokens, summed from the
    parts that the ranks holding them contribute (``RouterBalance.contribute``): the pipeline
    stages' parts may still be on their way, so they are awaited only when first needed (in the
    last stage's loss, or in backward, both after every stage's forward of the micro-batch)."""

    def __init__(self, num_experts: int, topk: int, weight: float):
        self.num_experts, self.topk = num_experts, topk
        self.weight = weight  # coefficient x real pairs: the loss's weight in the micro-batch's sum
        self._parts: list[tuple[torch.distributed.Work | None, torch.Tensor]] = []
        self._totals: torch.Tensor | None = None

    def add_part(self, totals: torch.Tensor, work: torch.distributed.Work | None = None) -> None:
        self._parts.append((work, totals))

    def _whole(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._totals is None:
            for work, _ in self._parts:
                if work is not None:
                    work.wait()
            self._totals = torch.stack([part.to(device) for _, part in self._parts]).sum(0)
        e = self.num_experts
        return self._totals[:e], self._totals[e : 2 * e], self._totals[-1].clamp(min=1.0)

    def value(self, device: torch.device) -> torch.Tensor:
        """HF's load-balancing loss of the micro-batch (unweighted, no gradient)."""
        counts, prob_sums, rows = self._whole(device)
        return self.num_experts * (counts * prob_sums).sum() / rows**2

    def gradient(self, device: torch.device) -> torch.Tensor:
        """The weighted loss's gradient with respect to one layer's summed probabilities, ``[E]``."""
        counts, _, rows = self._whole(device)
        return self.weight * self.num_experts * counts / rows**2


class _BalanceGradient(torch.autograd.Function):
    """The identity on a router's probabilities that, in backward, gives the layer's summed
    probabilities their gradient of the weighted load-balancing loss, scaled as megatron-core
    scales the main loss's (its ``MoEAuxLossAutoScaler`` carries that scale to every stage)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, prob_sums: torch.Tensor, balance: MicroBatchBalance) -> torch.Tensor:
        ctx.balance = balance
        return probs

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor):
        grad = ctx.balance.gradient(grad_probs.device)
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        if scale is not None:
            grad = grad * scale.to(grad.device)
        return grad_probs, grad, None


class RouterBalance:
    """HF's load-balancing loss across the ranks that hold a micro-batch, one per rank, shared by
    its model chunks.

    A micro-batch's tokens may be split over ``token_group`` (context parallelism, and the
    tensor-parallel ranks under sequence parallelism) and its layers over ``pipeline_group``.
    Each chunk's statistics are summed over ``token_group`` when its forward ends (those ranks run
    it together), then sent asynchronously over ``pipeline_group`` (gloo), as the stages reach
    the micro-batch at different times; every stage issues these in the same micro-batch order.
    With virtual pipeline stages each chunk sends its own part, matched by the micro-batch's
    ordinal, which every chunk counts the same way.
    """

    def __init__(
        self,
        coeff: float,
        num_experts: int,
        topk: int,
        chunks: int = 1,
        token_group: torch.distributed.ProcessGroup | None = None,
        pipeline_group: torch.distributed.ProcessGroup | None = None,
    ):
        self.coeff, self.num_experts, self.topk, self.chunks = coeff, num_experts, topk, chunks
        self.token_group, self.pipeline_group = token_group, pipeline_group
        self._open: dict[int, tuple[MicroBatchBalance, int]] = {}  # ordinal -> (balance, chunks seen)

    def micro_batch(self, ordinal: int, real_pairs: int) -> MicroBatchBalance:
        balance, seen = self._open.get(ordinal) or (
            MicroBatchBalance(self.num_experts, self.topk, self.coeff * real_pairs),
            0,
        )
        if seen + 1 == self.chunks:
            self._open.pop(ordinal, None)
        else:
            self._open[ordinal] = (balance, seen + 1)
        return balance

    def contribute(self, balance: MicroBatchBalance, totals: torch.Tensor) -> None:
        """Add a chunk's statistics of ``balance``'s micro-batch (``_Recording.totals``)."""
        if self.token_group is not None and self.token_group.size() > 1:
            torch.distributed.all_reduce(totals, group=self.token_group)
        if self.pipeline_group is None or self.pipeline_group.size() == 1:
            balance.add_part(totals)
            return
        host = totals.cpu()
        balance.add_part(host, torch.distributed.all_reduce(host, group=self.pipeline_group, async_op=True))


def router_balance(config, coeff: float, chunks: int) -> RouterBalance:
    """This rank's ``RouterBalance`` for a model of ``chunks`` chunks built with megatron-core's
    ``config``: tokens split over CP (and over TP under sequence parallelism), layers over the
    pipeline stages (exchanged on a gloo copy of the pipeline group, made here: every rank
    builds the model)."""
    from megatron.core import parallel_state

    from simpo_megatron.runtime import pipeline_gloo_group

    if config.sequence_parallel:
        token_group = parallel_state.get_tensor_and_context_parallel_group()
    else:
        token_group = parallel_state.get_context_parallel_group()
    return RouterBalance(
        coeff, config.num_moe_experts, config.moe_router_topk, chunks, token_group, pipeline_gloo_group()
    )


def _local_rows(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """``mask`` ``[s, b]`` cut to this tensor-parallel rank's ``rows`` of ``s`` when it is whole:
    megatron-core 0.16.1 scatters the mask for sequence parallelism on the first pipeline stage only."""
    if mask.shape[0] == rows:
        return mask
    from megatron.core import parallel_state

    return mask.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=0)[
        parallel_state.get_tensor_model_parallel_rank()
    ]


def layer_statistics(
    logits: torch.Tensor, num_experts: int, topk: int, real: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's routing of its real tokens: how often each expert is among the top k (``[E]``,
    no gradient), the sum of its softmax probability (``[E]``), and the number of tokens.
    ``logits`` ``[T, E]`` (or ``[s, b, E]``); ``real`` 1 (or True) for a real token, in the same
    token order, any shape of ``T`` elements; None: every token is real."""
    probs = torch.softmax(logits.reshape(-1, num_experts).float(), dim=-1)
    weights = torch.ones(probs.shape[0], device=probs.device) if real is None else real.reshape(-1).float()
    chosen = probs.detach().topk(topk, dim=-1).indices
    counts = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
    counts = counts.scatter_add(0, chosen.reshape(-1), weights.repeat_interleave(topk))
    return counts, (probs * weights[:, None]).sum(0), weights.sum()


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, topk: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """HF's ``load_balancing_loss_func``: ``E * sum_e f_e * P_e`` over the real tokens of all
    layers; ``router_logits`` ``[T, E]`` per layer, ``token_mask`` ``[T]`` (see
    ``layer_statistics``). Unweighted. The training path computes the same in parts
    (``RouterBalance``); this is its single-process reference."""
    stats = [layer_statistics(logits, num_experts, topk, token_mask) for logits in router_logits]
    counts, prob_sums, rows = (torch.stack(parts).sum(0) for parts in zip(*stats, strict=True))
    return num_experts * (counts * prob_sums).sum() / rows.clamp(min=1.0) ** 2
