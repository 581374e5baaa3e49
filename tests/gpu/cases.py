"""GPU cases, run by tests/gpu/test_gpu_training.py in a child process that sees the GPU.

``python tests/gpu/cases.py NAME`` runs one case in a world of one (TP=1) and prints its
findings as one JSON line; the test asserts on them. Cases:
  probe      what this process has: CUDA, compute capability, Transformer Engine
  local      the tiny model on local layers (SDPA core attention), bf16, 6 steps
  te         the same on megatron-core's Transformer Engine layer spec
  fp8        TE layers with FP8 "hybrid" (E4M3 forward, E5M2 backward), delayed scaling
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*", category=UserWarning)


def probe() -> dict:
    info = {"cuda": torch.cuda.is_available(), "capability": None, "te": None}
    if info["cuda"]:
        info["capability"] = list(torch.cuda.get_device_capability())
        info["device"] = torch.cuda.get_device_name()
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install that fails on load
        info["te"] = str(e) or type(e).__name__
    return info


def _config(impl: str, fp8: bool):
    from simpo_megatron.testing import tiny_config

    # Dimensions FP8 GEMMs accept (multiples of 16; 2 x 2 x 32 = 128 tokens a micro-batch).
    extra = (
        dict(fp8_format="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max")
        if fp8
        else {}
    )
    return tiny_config(
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=200,
        seq_length=32,
        micro_batch_size=2,
        global_batch_size=4,
        transformer_impl=impl,
        bf16=True,
        lr=1e-3,
        train_iters=6,
        **extra,
    )


class _DtypeSpies:
    """Record the dtypes that flow through the training step's log-prob head and loss."""

    def __init__(self):
        import simpo_megatron.logprobs as logprobs
        import simpo_megatron.training.step as step

        self.seen = {"softmax_logits": set(), "token_logps": set(), "seq_logps": set(), "losses": set()}
        cross_entropy = logprobs.tensor_parallel.vocab_parallel_cross_entropy
        token_logps = step.vocab_parallel_token_logps
        seq_logps = step.sequence_logps
        get_loss = step.get_loss

        def spy_cross_entropy(logits, target, *args, **kwargs):
            self.seen["softmax_logits"].add(str(logits.dtype))
            return cross_entropy(logits, target, *args, **kwargs)

        def spy_token_logps(*args, **kwargs):
            out = token_logps(*args, **kwargs)
            self.seen["token_logps"].add(str(out.dtype))
            return out

        def spy_seq_logps(*args, **kwargs):
            out = seq_logps(*args, **kwargs)
            self.seen["seq_logps"].add(str(out.dtype))
            return out

        def spy_get_loss(name):
            loss = get_loss(name)

            def recorded(*args, **kwargs):
                out = loss(*args, **kwargs)
                self.seen["losses"].add(str(out[0].dtype))
                return out

            return recorded

        logprobs.tensor_parallel.vocab_parallel_cross_entropy = spy_cross_entropy
        step.vocab_parallel_token_logps = spy_token_logps
        step.sequence_logps = spy_seq_logps
        step.get_loss = spy_get_loss


def _is_te_module(module: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("transformer_engine") for cls in type(module).__mro__)


def train(impl: str, fp8: bool) -> dict:
    """Train 6 steps on one repeated global batch of mock pairs; report what the test checks."""
    from megatron.core.utils import unwrap_model

    from simpo_megatron.data.provider import build_datasets, micro_batches
    from simpo_megatron.runtime import ParallelLayout, destroy_distributed, initialize_distributed
    from simpo_megatron.training.trainer import eval_step, setup_model_and_optimizer, train_step

    cfg = _config(impl, fp8)
    cfg.validate(1)
    initialize_distributed(ParallelLayout(), seed=1234)
    try:
        spies = _DtypeSpies()
        state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
        model = state.model[0]
        config = unwrap_model(model).config
        te_modules = [m for m in model.modules() if _is_te_module(m)]
        data = build_datasets(cfg)
        stream = micro_batches(data.train, cfg, data.pad_id, 0, 0, 1)
        batches = [next(stream) for _ in range(cfg.num_micro_batches(1))]
        before = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        steps, zero_grads, fp8_modules = [], None, []
        for i in range(cfg.optimizer.train_iters):
            result = train_step(cfg, state, batches)
            metrics = result["metrics"] or {}
            steps.append(
                {
                    "skipped": result["skipped"],
                    "grad_norm": result["grad_norm"],
                    "loss": metrics.get("loss"),
                    "num_pairs": metrics.get("num_pairs"),
                    "finite": all(math.isfinite(v) for v in metrics.values()),
                }
            )
            if i == 0:
                # DDP keeps each gradient in main_grad until the next step.
                zero_grads = [
                    name
                    for name, p in model.named_parameters()
                    if p.requires_grad and not p.main_grad.float().abs().sum() > 0
                ]
                fp8_modules = [type(m).__name__ for m in te_modules if getattr(m, "fp8", False)]
        changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach().float())]
        valid = eval_step(cfg, state, batches)
        return {
            "device": str(next(model.parameters()).device),
            "params_dtype": str(config.params_dtype),
            "fp8": config.fp8,
            "fp8_recipe": str(config.fp8_recipe) if config.fp8 else None,
            "te_modules": len(te_modules),
            "fp8_modules": fp8_modules,
            "steps": steps,
            "zero_grads": zero_grads,
            "changed_qkv": any("linear_qkv.weight" in name for name in changed),
            "valid_finite": valid is not None and all(math.isfinite(v) for v in valid.values()),
            "dtypes": {k: sorted(v) for k, v in spies.seen.items()},
        }
    finally:
        destroy_distributed()


CASES = {
    "probe": probe,
    "local": lambda: train("local", fp8=False),
    "te": lambda: train("transformer_engine", fp8=False),
    "fp8": lambda: train("transformer_engine", fp8=True),
}

if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]]()), flush=True)
