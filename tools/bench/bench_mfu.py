"""Model FLOPs utilisation of a packed SimPO step of a 1B-class Llama on one GPU (bf16).

The model has Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 query groups, MLP
8192, vocabulary 128256, tied embeddings), trained with --packing on UltraFeedback-shaped
pairs (tools/bench/bench_train.py's generator), the chunked log-prob head, and Transformer
Engine layers when TE is installed (else the local layers with SDPA attention). Without a GPU
it prints a JSON line saying why it skipped and exits 0.

FLOPs are counted as Megatron-LM's ``num_floating_point_operations`` does (forward and
backward, 3 x 2 x the GEMM multiply-adds, attention scores over the full sequence, the
logit layer), with the attention term summed per packed sequence (``s_i^2``) instead of
``batch x seq_length^2``: padding and cross-sequence attention are not work. MFU is those
FLOPs per second over the GPU's dense bf16 peak (``--peak-tflops`` to override).

    python tools/bench/bench_mfu.py [--steps 5] [--warmup 2] [--global-batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import simpo_megatron  # noqa: F401  the installed package
except ImportError:  # not installed: run from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

MODEL_1B = dict(
    num_layers=16,
    hidden_size=2048,
    ffn_hidden_size=8192,
    num_attention_heads=32,
    num_query_groups=8,
    vocab_size=128256,
    make_vocab_size_divisible_by=128,
    untie_embeddings_and_output_weights=False,
    rotary_base=500000,
    seq_length=2048,
    max_position_embeddings=2048,
)
# Dense bf16 peak of one GPU, by name fragment (NVIDIA data sheets, SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def model_flops(cfg, sequence_lengths: list[int]) -> float:
    """Forward + backward FLOPs of the model over these sequences (Megatron-LM's count)."""
    h, layers = cfg.model.hidden_size, cfg.model.num_layers
    heads, groups = cfg.model.num_attention_heads, cfg.model.num_query_groups or cfg.model.num_attention_heads
    q_size = (cfg.model.kv_channels or h // heads) * heads
    gated = 1.5 if cfg.model.swiglu else 1.0
    tokens = sum(sequence_lengths)
    per_token = (
        12
        * layers
        * h
        * h
        * (
            (1 + groups / heads) * q_size / h
            + cfg.derived_ffn_hidden_size() / h * gated
            + cfg.padded_vocab_size() / (2 * layers * h)
        )
    )
    attention = 12 * layers * q_size * sum(s * s for s in sequence_lengths)
    return per_token * tokens + attention


def _peak_tflops(override: float | None) -> float | None:
    import torch

    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _measure(steps: int, warmup: int, gbs: int, mbs: int, chunk: int, peak_override: float | None) -> dict:
    import importlib.util

    import torch

    from simpo_megatron.config import SimPOConfig
    from simpo_megatron.data.provider import global_batches
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.trainer import setup_model_and_optimizer, train_step

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import ultrafeedback_pairs

    te = importlib.util.find_spec("transformer_engine") is not None
    cfg = SimPOConfig(
        **MODEL_1B,
        micro_batch_size=mbs,
        global_batch_size=gbs,
        bf16=True,
        packing=True,
        logprob_chunk_size=chunk,
        transformer_impl="transformer_engine" if te else "local",
        lr=1e-6,
        clip_grad=1.0,
        train_iters=warmup + steps,
        mock_data=True,
    )
    cfg.validate(1)
    initialize_distributed(ParallelLayout(), seed=cfg.optimizer.seed)
    pairs = ultrafeedback_pairs(gbs * (warmup + steps), cfg.model.vocab_size)
    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    stream = global_batches(pairs, cfg, 0, 0, 0, 1, shuffle=False)
    seconds, flops, tokens, slots = 0.0, 0.0, 0, 0
    for step in range(warmup + steps):
        batches = next(stream)
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(cfg, state, batches)
        torch.cuda.synchronize()
        if step >= warmup:
            seconds += time.perf_counter() - start
            lengths = [int(n) for b in batches for n in (b.packed.cu_seqlens[1:] - b.packed.cu_seqlens[:-1]).tolist()]
            flops += model_flops(cfg, lengths)  # padding segments are counted: the GPU ran them
            tokens += sum(b.num_tokens for b in batches)
            slots += sum(b.tokens.numel() for b in batches)
    peak = _peak_tflops(peak_override)
    achieved = flops / seconds / 1e12
    return {
        "bench": "mfu",
        "device": torch.cuda.get_device_name(),
        "transformer_impl": cfg.model.transformer_impl,
        "model": "llama-1b-shape",
        "global_batch_size": gbs,
        "micro_batch_size": mbs,
        "seq_length": cfg.data.seq_length,
        "logprob_chunk_size": chunk,
        "steps": steps,
        "step_s": round(seconds / steps, 4),
        "real_tokens_per_s": round(tokens / seconds, 1),
        "packing_efficiency": round(tokens / slots, 4),
        "model_tflops_per_s": round(achieved, 1),
        "peak_bf16_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--logprob-chunk-size", type=int, default=4096)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"bench": "mfu", "skipped": "no CUDA device: MFU is measured on a GPU only"}), flush=True)
        return 0
    from simpo_megatron.testing import run_distributed

    result = run_distributed(
        _measure,
        1,
        args.steps,
        args.warmup,
        args.global_batch_size,
        args.micro_batch_size,
        args.logprob_chunk_size,
        args.peak_tflops,
        timeout=3600,
    )[0]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
