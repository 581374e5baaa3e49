"""The tiny model trained on one GPU through the real training step: local layers in bf16,
Transformer Engine layers, and TE with FP8 (delayed scaling, E4M3 forward / E5M2 backward).

Each case runs in a child process that sees the GPU (tests/gpu/gpu_child.py). On one repeated
global batch, 6 steps: no step skipped, every metric finite, every parameter gets a non-zero
gradient, the loss falls, the QKV weights change, and the log-prob head and the losses run in
fp32 whatever the model's dtype. Skipped, with the reason, without CUDA, without Transformer
Engine (TE cases), or on a GPU older than compute capability 8.9 (FP8).
"""

import pytest
from gpu_child import run_case, skip_reason

pytestmark = pytest.mark.gpu


def _check_training(result: dict) -> None:
    assert result["device"].startswith("cuda"), result["device"]
    assert result["params_dtype"] == "torch.bfloat16"
    steps = result["steps"]
    assert not any(s["skipped"] for s in steps), steps
    assert all(s["finite"] and s["num_pairs"] == 4 for s in steps), steps
    assert all(s["grad_norm"] is not None and s["grad_norm"] > 0 for s in steps), steps
    assert steps[-1]["loss"] < steps[0]["loss"], [s["loss"] for s in steps]
    assert not result["zero_grads"], f"parameters with an all-zero gradient: {result['zero_grads']}"
    assert result["changed_qkv"], "the optimizer steps changed no QKV weight"
    assert result["valid_finite"]
    dtypes = result["dtypes"]
    assert dtypes["softmax_logits"] == ["torch.float32"], dtypes
    assert dtypes["token_logps"] == dtypes["seq_logps"] == dtypes["losses"] == ["torch.float32"], dtypes


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_local_layers_bf16():
    result = run_case("local")
    _check_training(result)
    assert result["te_modules"] == 0 and result["fp8"] is None


@pytest.mark.skipif(skip_reason(te=True) is not None, reason=skip_reason(te=True) or "")
def test_transformer_engine_layers_bf16():
    result = run_case("te")
    _check_training(result)
    assert result["te_modules"] > 0 and result["fp8"] is None


@pytest.mark.skipif(skip_reason(te=True, fp8=True) is not None, reason=skip_reason(te=True, fp8=True) or "")
def test_transformer_engine_fp8():
    result = run_case("fp8")
    _check_training(result)
    assert result["fp8"] == "hybrid" and "delayed" in result["fp8_recipe"].lower()
    assert result["fp8_modules"], "no Transformer Engine module ran in FP8"
