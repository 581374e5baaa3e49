"""Per-rank memory estimate of a training run, from its config alone (no GPU, no weights).

``estimate_memory(cfg, world_size)`` returns, for the pipeline stage that needs the most:

- weights: this rank's parameters, in the parameter dtype;
- gradients: megatron-core's fp32 gradient buffer (``grad_reduce_in_fp32``);
- optimizer: Adam's two fp32 moments, plus an fp32 master copy of bf16/fp16 weights (SGD: the
  momentum), sharded over data-parallel x context-parallel ranks by the distributed optimizer;
- activations: what the forward keeps for backward, per micro-batch, times the micro-batches a
  stage holds at once under 1F1B (the first stage: up to PP, more when interleaved), with the
  log-prob head's on the last stage;
- transient: the largest short-lived buffer (the head's logits and their gradient, or one
  recompute group rerun in backward).

The activation terms count the tensors megatron-core's layers save for backward, as a
``SavedTensorMeter`` measures them (the memory test checks them on the CPU): per token of a
layer, the norms' inputs and outputs, the fused QKV output, the rotated query and key, the
attention output (and the scores when the attention is computed explicitly: soft-capping),
and the MLP's fc1 output and activations. Tokens are a micro-batch's: 2 x micro-batch size x
--seq-length (padded to the longest sequence at worst, or the packing budget), over CP ranks.
An MoE layer keeps its router's per-token tensors and, per routed row, its experts' (see
``_moe_activation_bytes``), with the routing assumed balanced over the experts; its experts'
weights are split over EP x TP, their optimizer state sharded over the ranks that hold the same
experts. Local layers in bf16/fp16 keep torch's norms' weights, and their inputs, in fp32.
Not counted: the CUDA context, communication buffers and allocator fragmentation (1-3 GB).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from simpo_megatron.config import ConfigError, SimPOConfig

GIB = 1024**3
# Of a device's memory, the share the estimate may fill: the rest is the CUDA context,
# communication buffers and the allocator's fragmentation.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank of the pipeline stage ``stage`` (the one that needs the most)."""

    stage: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    activations_per_micro_batch: int
    """The layers' and the head's activations of one micro-batch on this stage."""
    micro_batches_in_flight: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient

    def format(self) -> str:
        gib = {f.name: getattr(self, f.name) / GIB for f in dataclasses.fields(self)}
        return (
            f"memory estimate per GPU (pipeline stage {self.stage}): {self.total / GIB:.1f} GiB = "
            f"weights {gib['weights']:.1f} + gradients {gib['gradients']:.1f} + optimizer {gib['optimizer']:.1f} "
            f"+ activations {gib['activations']:.1f} ({self.micro_batches_in_flight} micro-batches in flight x "
            f"{gib['activations_per_micro_batch']:.2f}) + transient {gib['transient']:.1f}"
        )


def _dtype_bytes(cfg: SimPOConfig) -> int:
    return 2 if cfg.model.bf16 or cfg.model.fp16 else 4


def _mlp_parameters(cfg: SimPOConfig, width: int) -> int:
    """Weights of one MLP of hidden ``width`` (fc1, doubled when gated, and fc2), unsplit."""
    m = cfg.model
    return m.hidden_size * width * (2 if m.swiglu or m.geglu else 1) + width * m.hidden_size


def expert_parameters(cfg: SimPOConfig) -> int:
    """Parameters of one MoE layer's experts on one rank: its ``E / EP`` experts, each split over
    TP (megatron-core's expert tensor parallelism defaults to TP); 0 for a dense model."""
    m, par = cfg.model, cfg.parallel
    if m.num_experts is None:
        return 0
    per_expert = _mlp_parameters(cfg, m.moe_ffn_hidden_size or m.derived_ffn_hidden_size())
    return m.num_experts // par.expert_model_parallel_size * per_expert // par.tensor_model_parallel_size


def layer_parameters(cfg: SimPOConfig) -> int:
    """Parameters of one transformer layer on one rank (an MoE layer's router and this rank's experts)."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, f = m.hidden_size, m.derived_ffn_hidden_size()
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d = m.kv_channels or h // heads
    qkv = (heads + 2 * groups) * d
    norm = 2 * h if m.normalization == "LayerNorm" else h
    params = h * qkv // tp + (qkv // tp if m.add_qkv_bias else 0) + heads * d * h // tp
    if m.num_experts is None:
        params += _mlp_parameters(cfg, f) // tp
    else:  # the router's weight is whole on every rank
        params += m.num_experts * h + expert_parameters(cfg)
    if m.qk_layernorm:
        params += 2 * d
    return params + norm * (4 if m.sandwich_norm else 2)


def stage_parameters(cfg: SimPOConfig, stage: int) -> int:
    """Parameters on one rank of pipeline stage ``stage``."""
    m, pp = cfg.model, cfg.parallel.pipeline_model_parallel_size
    vocab = cfg.padded_vocab_size() // cfg.parallel.tensor_model_parallel_size * m.hidden_size
    params = layer_parameters(cfg) * (m.num_layers // pp)
    if stage == 0:
        params += vocab
    if stage == pp - 1:
        params += (2 if m.normalization == "LayerNorm" else 1) * m.hidden_size
        # The output layer; tied to the embeddings, the last stage of PP > 1 keeps a copy.
        if m.untie_embeddings_and_output_weights or pp > 1:
            params += vocab
    return params


def fp32_parameters(cfg: SimPOConfig, stage: int) -> int:
    """Of ``stage_parameters``, those kept in fp32 in a bf16/fp16 run: the weights of torch's
    norms, which the local layers use unless the norms are this project's RMSNorm ((1 + weight)
    norms, sandwich norms, sequence parallelism)."""
    m, par = cfg.model, cfg.parallel
    if _dtype_bytes(cfg) == 4 or m.transformer_impl == "transformer_engine":
        return 0
    if m.apply_layernorm_1p or par.sequence_parallel:
        return 0
    norm = 2 * m.hidden_size if m.normalization == "LayerNorm" else m.hidden_size
    params = 0 if m.sandwich_norm else 2 * norm * (m.num_layers // par.pipeline_model_parallel_size)
    return params + (norm if stage == par.pipeline_model_parallel_size - 1 else 0)


def micro_batch_tokens(cfg: SimPOConfig) -> int:
    """Token slots of a micro-batch on one CP rank: chosen and rejected of each pair, padded to
    --seq-length at worst; a packed micro-batch's budget is the same number."""
    return 2 * cfg.data.micro_batch_size * cfg.data.seq_length // cfg.parallel.context_parallel_size


def _norm_bytes(cfg: SimPOConfig) -> int:
    """Bytes a norm keeps per element: its input and output (the next linear's input); torch's
    norms also keep the normalized input, and in bf16/fp16 compute in fp32 (input and normalized
    input kept in fp32)."""
    e = _dtype_bytes(cfg)
    return 2 * e if cfg.model.transformer_impl == "transformer_engine" else 8 + e


def _layer_activation_bytes(cfg: SimPOConfig, tokens: int) -> tuple[int, int, int, int]:
    """(everything, what selective recompute of core_attn drops, of mlp, of moe) kept for
    backward by one layer, for ``tokens`` tokens of one rank."""
    m, par = cfg.model, cfg.parallel
    tp, cp, e = par.tensor_model_parallel_size, par.context_parallel_size, _dtype_bytes(cfg)
    h, f = m.hidden_size, m.derived_ffn_hidden_size() // tp
    heads, groups = m.num_attention_heads // tp, (m.num_query_groups or m.num_attention_heads) // tp
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    te = m.transformer_impl == "transformer_engine"
    norms = 4 if m.sandwich_norm else 2
    hidden = norms * _norm_bytes(cfg) * h // (tp if par.sequence_parallel else 1)
    # The QKV output (the value is a view of it), the rotated query and key, the attention output.
    attention = (heads + 2 * groups) * d + 2 * heads * d + groups * d
    if cp > 1 and not te:  # the local context-parallel attention keeps the gathered keys and values
        attention += 2 * groups * d * cp
    softmax_stats = 4 * heads  # fp32 log-sum-exp per query and head
    explicit_scores = 0
    if m.attn_logit_softcapping is not None and not te:
        # Scores computed explicitly: the fp32 tanh and softmax outputs (and the probabilities
        # cast back to a 16-bit dtype), over at most --seq-length keys per query; GQA repeats keys and values.
        softmax_stats = 0
        per_score = 8 + (e if e != 4 else 0)
        explicit_scores = heads * cfg.data.seq_length * per_score
        if groups != heads:
            attention += 2 * heads * d
    gated = m.swiglu or m.geglu
    fused = gated and m.swiglu and te  # Transformer Engine / fused SwiGLU keeps only its input
    mlp = (2 * f + (f if fused else 3 * f)) if gated else 2 * f
    dropout = 2 * h if m.hidden_dropout > 0 else 0  # bool masks, one byte each
    moe = 0
    if m.num_experts is not None:
        mlp, moe = 0, _moe_activation_bytes(cfg, tokens)
    everything = tokens * (hidden + e * (attention + mlp) + softmax_stats + explicit_scores + dropout) + moe
    core_attn = tokens * (softmax_stats + explicit_scores)
    return everything, core_attn, tokens * e * mlp, moe


def _moe_activation_bytes(cfg: SimPOConfig, tokens: int) -> int:
    """What an MoE layer (megatron-core's router, all-to-all dispatcher and sequential experts)
    keeps for backward, for ``tokens`` tokens of one rank, with the routing balanced: each rank's
    experts then compute ``tokens x top-k`` rows (under TP, those of all TP ranks, each on its
    slice of the expert width). Per router token: the top-k indices (int64) and probabilities
    (fp32), the routing map (bool) and probabilities over all experts (fp32), the padding mask,
    the permutation's sorted indices, and with the load-balancing loss its softmax and weights
    (fp32). Per routed row: the permuted input, fc1's output (2 x width when gated), the
    activation's four width-sized tensors, and the row's probability (fp32)."""
    m, par, e = cfg.model, cfg.parallel, _dtype_bytes(cfg)
    tp, k, experts = par.tensor_model_parallel_size, m.moe_router_topk, m.num_experts
    width = (m.moe_ffn_hidden_size or m.derived_ffn_hidden_size()) // tp
    router_tokens = tokens // tp if par.sequence_parallel else tokens
    router = router_tokens * (k * (8 + 4 + 8) + 1 + experts * (1 + e))
    if m.moe_aux_loss_coeff:
        router += router_tokens * (experts + 1) * 4
    gated = m.swiglu or m.geglu
    rows = tokens * k * e * (m.hidden_size + (2 if gated else 1) * width + 4 * width + 1)
    return router + rows


def _head_bytes(cfg: SimPOConfig, tokens: int) -> tuple[int, int]:
    """(kept for backward, transient) of the last stage's final norm and log-prob head."""
    m, tp, e = cfg.model, cfg.parallel.tensor_model_parallel_size, _dtype_bytes(cfg)
    vocab = cfg.padded_vocab_size() // tp
    norm = _norm_bytes(cfg) * m.hidden_size * tokens
    if m.logprob_chunk_size > 0:
        # Each chunk's logits are recomputed in backward: fp32 logits, their softmax and gradient.
        return norm, 3 * 4 * min(m.logprob_chunk_size, tokens) * vocab
    # The fp32 softmax over this rank's vocabulary (soft-capping keeps its tanh output too).
    kept = tokens * vocab * (4 + (e if m.final_logit_softcapping is not None else 0))
    return norm + kept, tokens * vocab * (e + 4 + 4)


def _in_flight(cfg: SimPOConfig, world_size: int, stage: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once (per model chunk, interleaved)."""
    pp = cfg.parallel.pipeline_model_parallel_size
    micro_batches = cfg.num_micro_batches(world_size)
    vpp = cfg.virtual_pipeline_model_parallel_size()
    if vpp is None:
        return min(micro_batches, pp - stage)
    # Megatron-core's interleaved 1F1B: warm-up forwards of model chunks, plus the one in steady state.
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
    return min(micro_batches * vpp, warmup + 1)


def _stage_activations(cfg: SimPOConfig, world_size: int, stage: int) -> tuple[int, int, int, int]:
    """(activations of all micro-batches in flight, of one micro-batch, in flight, transient) on ``stage``."""
    m, pp = cfg.model, cfg.parallel.pipeline_model_parallel_size
    tokens = micro_batch_tokens(cfg)
    vpp = cfg.virtual_pipeline_model_parallel_size()
    chunk_layers = m.num_layers // pp // (vpp or 1)
    layer, core_attn, mlp, moe = _layer_activation_bytes(cfg, tokens)
    inputs = tokens * m.hidden_size * _dtype_bytes(cfg)
    if cfg.parallel.sequence_parallel:
        inputs //= cfg.parallel.tensor_model_parallel_size
    transient = layer  # one layer's activation gradients in backward
    granularity, n = m.recompute_granularity, m.recompute_num_layers
    if granularity == "full" and m.recompute_method == "uniform":
        chunk = chunk_layers // n * inputs
        transient = n * layer
    elif granularity == "full":
        chunk = n * inputs + (chunk_layers - n) * layer
        transient = layer
    elif granularity == "selective":
        modules = m.recompute_modules or ["core_attn"]
        dropped = (core_attn if "core_attn" in modules else 0) + (mlp if "mlp" in modules else 0)
        dropped += moe if "moe" in modules else 0
        if "layernorm" in modules:
            dropped += 2 * inputs  # the two norms' outputs
        chunk = chunk_layers * (layer - dropped)
    else:
        chunk = chunk_layers * layer
    in_flight = _in_flight(cfg, world_size, stage)
    per_micro_batch = chunk * (vpp or 1)
    activations = chunk * in_flight if vpp else per_micro_batch * in_flight
    if stage == pp - 1:
        head, head_transient = _head_bytes(cfg, tokens)
        activations += head
        per_micro_batch += head
        transient = max(transient, head_transient)
    return activations, per_micro_batch, in_flight, transient


def estimate_stage(cfg: SimPOConfig, world_size: int, stage: int) -> MemoryEstimate:
    """The estimate for one rank of pipeline stage ``stage``; ``cfg`` validated for ``world_size``."""
    par = cfg.parallel
    params, fp32 = stage_parameters(cfg, stage), fp32_parameters(cfg, stage)
    e = _dtype_bytes(cfg)
    half = e < 4
    if cfg.optimizer.optimizer == "adam":
        state = 8 + (4 if half else 0)
    else:
        state = (4 if cfg.optimizer.sgd_momentum > 0 else 0) + (4 if half else 0)
    optimizer = params * state - fp32 * (4 if half else 0)  # fp32 parameters need no fp32 master copy
    if par.use_distributed_optimizer:
        # Dense parameters are sharded over DP x CP, the experts over the ranks holding the same
        # experts: world / (PP x EP x TP).
        experts = expert_parameters(cfg) * (cfg.model.num_layers // par.pipeline_model_parallel_size)
        expert_dp = world_size // (
            par.pipeline_model_parallel_size * par.expert_model_parallel_size * par.tensor_model_parallel_size
        )
        dense = (params - experts) * state // (cfg.data_parallel_size(world_size) * par.context_parallel_size)
        optimizer = dense + experts * state // expert_dp
    activations, per_micro_batch, in_flight, transient = _stage_activations(cfg, world_size, stage)
    return MemoryEstimate(
        stage=stage,
        weights=(params - fp32) * e + fp32 * 4,
        gradients=params * 4,
        optimizer=optimizer,
        activations=activations,
        transient=transient,
        activations_per_micro_batch=per_micro_batch,
        micro_batches_in_flight=in_flight,
    )


def estimate_memory(cfg: SimPOConfig, world_size: int) -> MemoryEstimate:
    """The estimate of the pipeline stage that needs the most memory; ``cfg`` validated, with
    its --vocab-size known."""
    if cfg.model.vocab_size is None:
        raise ConfigError("the memory estimate needs --vocab-size (or a tokenizer to read it from)")
    stages = range(cfg.parallel.pipeline_model_parallel_size)
    return max((estimate_stage(cfg, world_size, s) for s in stages), key=lambda est: est.total)


# (flags, settings) tried, in this order, when a run does not fit: each alone, from the current config.
_REMEDIES = (
    ("--recompute-granularity selective", dict(recompute_granularity="selective")),
    (
        "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1",
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1, recompute_modules=[]),
    ),
    ("--use-distributed-optimizer", dict(use_distributed_optimizer=True)),
    ("--logprob-chunk-size 4096", dict(logprob_chunk_size=4096)),
)


def _remedies(cfg: SimPOConfig) -> list[tuple[str, dict]]:
    par, data, flat = cfg.parallel, cfg.data, cfg.to_flat()
    out = [(flags, values) for flags, values in _REMEDIES if any(flat[k] != v for k, v in values.items())]
    if cfg.model.recompute_granularity == "full":  # already the most recompute
        out = [(flags, values) for flags, values in out if "recompute" not in flags]
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    if cfg.model.num_experts is not None:
        out.append((f"--expert-model-parallel-size {2 * ep}", dict(expert_model_parallel_size=2 * ep)))
    out.append((f"--tensor-model-parallel-size {2 * tp}", dict(tensor_model_parallel_size=2 * tp)))
    out.append((f"--pipeline-model-parallel-size {2 * pp}", dict(pipeline_model_parallel_size=2 * pp)))
    if data.micro_batch_size > 1:
        out.append(
            (f"--micro-batch-size {data.micro_batch_size // 2}", dict(micro_batch_size=data.micro_batch_size // 2))
        )
    return out


def fitting_changes(cfg: SimPOConfig, world_size: int, budget: int) -> tuple[bool, list[tuple[str, float]]]:
    """Whether some single change brings the estimate under ``budget`` bytes, and (flags,
    estimated GiB) of those that do and are valid for ``world_size``, or, if none does, of
    those that lower it, lowest first."""
    current = estimate_memory(cfg, world_size).total
    fits, helps = [], []
    for flags, values in _remedies(cfg):
        try:
            changed = cfg.replace(**values).validate(world_size)
        except (ConfigError, ValueError):
            continue
        total = estimate_memory(changed, world_size).total
        if total <= budget:
            fits.append((flags, total / GIB))
        elif total < current:
            helps.append((flags, total / GIB))
    return (True, fits) if fits else (False, sorted(helps, key=lambda fh: fh[1]))


def memory_warning(cfg: SimPOConfig, world_size: int, device_bytes: int) -> str | None:
    """A warning naming the flags that would make the run fit when the estimate exceeds the
    usable part of ``device_bytes`` (None when it fits)."""
    estimate = estimate_memory(cfg, world_size)
    budget = int(device_bytes * USABLE_FRACTION)
    if estimate.total <= budget:
        return None
    fits, changes = fitting_changes(cfg, world_size, budget)
    head = (
        f"WARNING: the memory estimate, {estimate.total / GIB:.1f} GiB per GPU, exceeds "
        f"{USABLE_FRACTION:.0%} of {device_bytes / GIB:.0f} GiB"
    )
    if not changes:
        return head + "; no single change of recompute, distributed optimizer, TP/PP or micro-batch size helps"
    listed = "; ".join(f"{flags} ({gib:.1f} GiB)" for flags, gib in changes)
    return f"{head}. Would fit: {listed}" if fits else f"{head}. Would help (none fits alone): {listed}"


def startup_report(cfg: SimPOConfig, world_size: int, device_bytes: int | None) -> str:
    """The estimate line printed at the start of training, with the warning when it does not
    fit ``device_bytes`` (--gpu-memory-gb, else the CUDA device's memory; None: no check)."""
    lines = [estimate_memory(cfg, world_size).format()]
    if device_bytes is not None:
        warning = memory_warning(cfg, world_size, device_bytes)
        if warning:
            lines.append(warning)
    return "\n".join(lines)


def device_budget(cfg: SimPOConfig) -> int | None:
    """Bytes of GPU memory per rank: --gpu-memory-gb, else the CUDA device's, else None."""
    if cfg.memory.gpu_memory_gb is not None:
        return int(cfg.memory.gpu_memory_gb * GIB)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None
