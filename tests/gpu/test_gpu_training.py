"""The tiny model on GPUs through the real training step (tests/gpu/cases.py has the cases).

Training (one GPU): local layers in bf16, Transformer Engine layers, and TE with FP8 (delayed
scaling, E4M3 forward / E5M2 backward), 6 steps on one repeated global batch: no step skipped,
every metric finite, every parameter gets a non-zero gradient, the loss falls, the QKV weights
change, and the log-prob head and the losses run in fp32 whatever the model's dtype.

Equivalence, on the same weights, one forward and backward: TE against local layers, padded and
packed (THD); TE packed against padded; a mixture of experts (router loss on) on TE against
local layers, padded and packed; one FP8 step's loss against the bf16 step's; on two
GPUs, the chunked log-prob head with sequence parallelism against without (TP=2), and
context parallelism 2 against 1 on TE. Bounds: cases.py's docstring.

Each test is skipped, with the reason, without CUDA, Transformer Engine, an FP8-capable GPU
(compute capability 8.9) or a second GPU. Each records its figure (``record_property``), which
``tools/gpu_check.py`` prints.
"""

import pytest
from gpu_child import case, skip_reason

pytestmark = pytest.mark.gpu


def _skip_unless(**needs):
    reason = skip_reason(**needs)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


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


def _training_figure(result: dict) -> str:
    return f"loss {result['steps'][0]['loss']:.4g} -> {result['steps'][-1]['loss']:.4g} in {len(result['steps'])} steps"


def _check_within_bounds(result: dict, record_property) -> None:
    """Every difference within its bound; the figure says each with its bound."""
    figure = ", ".join(f"{k} {v:.2e} (<= {result['bound'][k]:.2e})" for k, v in result["diff"].items())
    record_property("figure", figure)
    over = {k: v for k, v in result["diff"].items() if not v <= result["bound"][k]}
    assert not over, f"differences over their bounds: {figure}; details: {result}"


@_skip_unless()
def test_local_layers_bf16(record_property):
    result = case("single", "local")
    record_property("figure", _training_figure(result))
    _check_training(result)
    assert result["te_modules"] == 0 and result["fp8"] is None


@_skip_unless(te=True)
def test_transformer_engine_layers_bf16(record_property):
    result = case("single", "te")
    record_property("figure", _training_figure(result))
    _check_training(result)
    assert result["te_modules"] > 0 and result["fp8"] is None


@_skip_unless(te=True, fp8=True)
def test_transformer_engine_fp8(record_property):
    result = case("single", "fp8")
    record_property("figure", _training_figure(result))
    _check_training(result)
    assert result["fp8"] == "hybrid" and "delayed" in result["fp8_recipe"].lower()
    assert result["fp8_modules"], "no Transformer Engine module ran in FP8"


@_skip_unless(te=True)
@pytest.mark.parametrize("batches", ["padded", "packed"])
def test_te_matches_local_layers(batches, record_property):
    _check_within_bounds(case("single", f"te_vs_local_{batches}"), record_property)


@_skip_unless(te=True)
def test_te_packed_matches_padded(record_property):
    result = case("single", "te_packed_vs_padded")
    assert result["num_micro_batches"]["packed"] >= 1
    _check_within_bounds(result, record_property)


@_skip_unless(te=True)
@pytest.mark.parametrize("batches", ["padded", "packed"])
def test_moe_te_matches_local_layers(batches, record_property):
    result = case("single", f"moe_te_vs_local_{batches}")
    assert result["load_balancing_loss"] > 0
    _check_within_bounds(result, record_property)


@_skip_unless(te=True, fp8=True)
def test_fp8_step_loss_near_bf16(record_property):
    _check_within_bounds(case("single", "fp8_vs_bf16"), record_property)


@_skip_unless(te=True, gpus=2)
def test_chunked_head_with_sequence_parallel_matches_without(record_property):
    _check_within_bounds(case("sp", "chunked_head_sp"), record_property)


@_skip_unless(te=True, gpus=2)
@pytest.mark.parametrize("batches", ["padded", "packed"])
def test_te_context_parallel_2_matches_1(batches, record_property):
    _check_within_bounds(case("cp", f"cp2_{batches}"), record_property)
