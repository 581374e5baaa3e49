"""A tiny FP8 forward and backward through the real training step, on a GPU with Transformer Engine.

Single process (a world of one, TP=1) with megatron-core's Transformer Engine layer spec,
bf16 parameters and FP8 "hybrid" (E4M3 forward, E5M2 backward) with delayed scaling. It checks
that FP8 is really on in the transformer layers, that the loss and metrics are finite, that
every parameter gets a non-zero gradient, and that the log-prob head works in fp32: the logits
that enter the softmax, the per-token and per-sequence log-probs and the SimPO losses.

Skipped, with the reason, without CUDA, without the transformer_engine package, or on a GPU
older than compute capability 8.9 (FP8 needs Ada or Hopper).
"""

import math

import pytest
import torch


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install that fails on load
        return f"needs Transformer Engine: importing transformer_engine.pytorch failed ({e})"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        return f"FP8 needs compute capability 8.9 or newer; this GPU is {capability[0]}.{capability[1]}"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]


def fp8_config():
    from simpo_megatron.testing import tiny_config

    # FP8 GEMMs want dimensions that are multiples of 16 and token counts multiple of 8:
    # hidden 128, head dim 32, QKV out 256, FFN 256 (fc1 out 512), 2 x 2 x 32 = 128 tokens.
    return tiny_config(
        num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
        vocab_size=200, seq_length=32, micro_batch_size=2, global_batch_size=4,
        transformer_impl="transformer_engine", bf16=True,
        fp8_format="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="max",
        lr=1e-3, train_iters=3,
    )


@pytest.fixture
def single_process_world():
    from simpo_megatron.runtime import ParallelLayout, destroy_distributed, initialize_distributed

    initialize_distributed(ParallelLayout(tensor_model_parallel_size=1), seed=1234)
    yield
    destroy_distributed()


@pytest.fixture
def dtype_spies(monkeypatch):
    """Record the dtypes that flow through the loss function of the training step."""
    import simpo_megatron.logprobs as logprobs
    import simpo_megatron.training.step as step

    seen = {"model_logits": [], "softmax_logits": [], "token_logps": [], "seq_logps": [], "losses": []}
    real_token_logps = step.vocab_parallel_token_logps
    real_cross_entropy = logprobs.tensor_parallel.vocab_parallel_cross_entropy
    real_sequence_logps = step.sequence_logps
    real_get_loss = step.get_loss

    def token_logps(logits, labels, vocab_size=None):
        seen["model_logits"].append(logits.dtype)
        out = real_token_logps(logits, labels, vocab_size)
        seen["token_logps"].append(out.dtype)
        return out

    def cross_entropy(logits, target, *args, **kwargs):
        seen["softmax_logits"].append(logits.dtype)
        return real_cross_entropy(logits, target, *args, **kwargs)

    def sequence_logps(per_token_logps, loss_mask, average=True):
        out = real_sequence_logps(per_token_logps, loss_mask, average=average)
        seen["seq_logps"].append(out.dtype)
        return out

    def get_loss(name):
        loss = real_get_loss(name)

        def recorded(*args, **kwargs):
            losses, chosen_rewards, rejected_rewards = loss(*args, **kwargs)
            seen["losses"].append(losses.dtype)
            return losses, chosen_rewards, rejected_rewards

        return recorded

    monkeypatch.setattr(step, "vocab_parallel_token_logps", token_logps)
    monkeypatch.setattr(logprobs.tensor_parallel, "vocab_parallel_cross_entropy", cross_entropy)
    monkeypatch.setattr(step, "sequence_logps", sequence_logps)
    monkeypatch.setattr(step, "get_loss", get_loss)
    return seen


def _is_te_module(module: torch.nn.Module) -> bool:
    return any(cls.__module__.startswith("transformer_engine") for cls in type(module).__mro__)


def test_fp8_forward_backward_through_the_training_step(single_process_world, dtype_spies):
    from simpo_megatron.data.provider import build_datasets, micro_batches
    from simpo_megatron.model.fp8 import check_transformer_engine
    from simpo_megatron.training.trainer import eval_step, setup_model_and_optimizer, train_step

    cfg = fp8_config()
    cfg.validate(1)
    check_transformer_engine(cfg)  # the run-time check passes where this test runs

    state = setup_model_and_optimizer(cfg, cfg.padded_vocab_size())
    model = state.model[0]
    config = model.module.config if hasattr(model, "module") else model.config
    assert config.fp8 == "hybrid" and config.fp8_recipe == "delayed"
    assert config.bf16 and config.params_dtype == torch.bfloat16
    te_modules = [m for m in model.modules() if _is_te_module(m)]
    assert te_modules, "the Transformer Engine layer spec built no Transformer Engine modules"

    data = build_datasets(cfg)
    stream = micro_batches(data.train, cfg, data.pad_id, 0, 0, 1)
    before = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    # Several steps: delayed scaling uses the amax history of earlier steps from the second on.
    for step in range(cfg.train_iters):
        batches = [next(stream) for _ in range(cfg.num_micro_batches(1))]
        result = train_step(cfg, state, batches)
        assert not result["skipped"], f"step {step}: non-finite loss or gradient under FP8"
        metrics = result["metrics"]
        assert metrics is not None and metrics["num_pairs"] == cfg.global_batch_size
        for key, value in metrics.items():
            assert math.isfinite(value), f"step {step}: {key} = {value}"
        assert metrics["loss"] > 0
        assert result["grad_norm"] is not None and math.isfinite(result["grad_norm"]) and result["grad_norm"] > 0

        if step == 0:
            # FP8 was on in the transformer layers (megatron-core's fp8_autocast around the block).
            fp8_on = [type(m).__name__ for m in te_modules if getattr(m, "fp8", False)]
            assert fp8_on, "no Transformer Engine module ran in FP8"
            # Every parameter got a non-zero gradient (DDP keeps it in main_grad until the next step).
            zero = [name for name, p in model.named_parameters()
                    if p.requires_grad and not p.main_grad.float().abs().sum() > 0]
            assert not zero, f"parameters with an all-zero gradient: {zero}"

    after = {name: p.detach().float() for name, p in model.named_parameters()}
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("linear_qkv.weight" in name for name in changed), "the optimizer steps changed no QKV weight"

    # The log-prob head ran in fp32 whatever the model's dtype: the logits entering the softmax,
    # the per-token and per-sequence log-probs, and the losses.
    seen = dtype_spies
    assert seen["softmax_logits"] and set(seen["softmax_logits"]) == {torch.float32}, (
        f"softmax logits {set(seen['softmax_logits'])} (model output {set(seen['model_logits'])})"
    )
    assert set(seen["token_logps"]) == {torch.float32}
    assert set(seen["seq_logps"]) == {torch.float32}
    assert set(seen["losses"]) == {torch.float32}
    assert set(seen["model_logits"]) <= {torch.bfloat16, torch.float32}

    # Evaluation (forward only) runs under FP8 too.
    valid = eval_step(cfg, state, [next(stream) for _ in range(cfg.num_micro_batches(1))])
    assert valid is not None and all(math.isfinite(v) for v in valid.values())
