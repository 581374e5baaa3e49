"""Vocab-parallel log-probs at TP=2 equal a single-process log_softmax + gather."""

import pytest
import torch

from simpo_megatron.testing import run_distributed

VOCAB, PADDED = 250, 256  # 6 padding entries, all on the second TP rank


def _reference(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab].double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(6, 3, PADDED, generator=gen)).to(dtype)
    logits[..., VOCAB:] = 30.0  # padded entries would dominate the softmax if not masked out
    labels = torch.randint(0, VOCAB, (6, 3), generator=gen)
    return logits, labels


def _worker(tp: int):
    """This rank's log-probs and logit gradients, for fp32 and bf16 logits."""
    from megatron.core import parallel_state

    from simpo_megatron.logprobs import vocab_parallel_token_logps
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed

    initialize_distributed(ParallelLayout(tensor_model_parallel_size=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    part = PADDED // tp
    out = {}
    for dtype_name in ("float32", "bfloat16"):
        logits, labels = _inputs(getattr(torch, dtype_name))
        local = logits[..., rank * part : (rank + 1) * part].clone().requires_grad_(True)
        logps = vocab_parallel_token_logps(local, labels, vocab_size=VOCAB)
        weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
        (logps * weights).sum().backward()
        out[dtype_name] = (logps.detach(), local.grad.float(), logps.dtype)
    return out


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_worker, 2, 2)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_tp2_matches_single_process(tp2_results, dtype_name):
    results = [r[dtype_name] for r in tp2_results]
    logits, labels = _inputs(getattr(torch, dtype_name))
    expected = _reference(logits.float(), labels, VOCAB)
    for logps, _, out_dtype in results:
        assert out_dtype == torch.float32
        torch.testing.assert_close(logps.double(), expected, rtol=0, atol=1e-5)

    # Gradient w.r.t. the (sharded) logits equals autograd through the reference.
    ref_logits = logits.float().clone().requires_grad_(True)
    ref = _reference(ref_logits, labels, VOCAB)
    weights = torch.linspace(-1, 1, ref.numel(), dtype=torch.float64).view_as(ref)
    (ref * weights).sum().backward()
    grad = torch.cat([g for _, g, _ in results], dim=-1)
    expected_grad = ref_logits.grad
    if dtype_name == "bfloat16":
        # bf16 logits get the fp32 gradient rounded to bf16: the reference rounded the same way,
        # within one bf16 step (2**-8 relative) for values that fall near a rounding boundary.
        expected_grad = expected_grad.to(torch.bfloat16).float()
        torch.testing.assert_close(grad, expected_grad, rtol=2**-8, atol=1e-9)
    else:
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)
    # The comparison must be able to fail: the gradient is far from zero where it is checked.
    assert expected_grad[..., :VOCAB].abs().max() > 0.1
    assert torch.all(grad[..., VOCAB:] == 0)


HIDDEN, CHUNK = 16, 5  # 18 tokens in chunks of 5: the last chunk is partial


def _softcap(logits: torch.Tensor, cap: float = 3.0) -> torch.Tensor:
    """Gemma-2's final logit soft-capping (a small cap so that it bends these logits)."""
    return cap * torch.tanh(logits / cap)


TRANSFORMS = {"none": None, "softcap": _softcap}


def _head_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 3, HIDDEN, generator=gen).to(dtype)
    weight = torch.randn(PADDED, HIDDEN, generator=gen).to(dtype)
    labels = torch.randint(0, VOCAB, (6, 3), generator=gen)
    return hidden, weight, labels


def _head_reference(hidden, weight, labels, transform):
    """Autograd through full-vocabulary log_softmax(transform(h @ W.T)) in float64."""
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    logits = h @ w[:VOCAB].t()
    if transform is not None:
        logits = transform(logits)
    logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (logps * _weights(logps)).sum().backward()
    return logps.detach(), h.grad, w.grad


def _weights(t):
    return torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)


def _head_worker(tp: int):
    """Chunked and unchunked heads on this rank's weight shard: log-probs and gradients."""
    from megatron.core import parallel_state, tensor_parallel

    from simpo_megatron.logprobs import chunked_vocab_parallel_token_logps, vocab_parallel_token_logps
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed

    initialize_distributed(ParallelLayout(tensor_model_parallel_size=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    part = PADDED // tp
    out = {}
    for dtype_name in ("float32", "bfloat16"):
        for name, transform in TRANSFORMS.items():
            hidden, weight, labels = _head_inputs(getattr(torch, dtype_name))
            results = {}
            for method in ("chunked", "unchunked"):
                h = hidden.clone().requires_grad_(True)
                w = weight[rank * part : (rank + 1) * part].clone().requires_grad_(True)
                if method == "chunked":
                    logps = chunked_vocab_parallel_token_logps(h, w, labels, VOCAB, CHUNK, transform)
                else:  # what the output layer and today's head compute
                    logits = tensor_parallel.copy_to_tensor_model_parallel_region(h) @ w.t()
                    if transform is not None:
                        logits = transform(logits.float())
                    logps = vocab_parallel_token_logps(logits, labels, VOCAB)
                (logps * _weights(logps)).sum().backward()
                results[method] = (logps.detach(), h.grad.float(), w.grad.float(), h.grad.dtype)
            out[dtype_name, name] = results
    return out


@pytest.fixture(scope="module")
def head_results():
    return run_distributed(_head_worker, 2, 2)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_chunked_head_equals_unchunked_and_reference(head_results, dtype_name, transform):
    hidden, weight, labels = _head_inputs(getattr(torch, dtype_name))
    ref_logps, ref_grad_h, ref_grad_w = _head_reference(hidden.float(), weight.float(), labels, TRANSFORMS[transform])
    by_rank = [r[dtype_name, transform] for r in head_results]
    fp32 = dtype_name == "float32"
    for method in ("chunked", "unchunked"):
        grad_w = torch.cat([r[method][2] for r in by_rank])
        assert torch.all(grad_w[VOCAB:] == 0), method
        for logps, grad_h, _, grad_dtype in (r[method] for r in by_rank):
            assert logps.dtype == torch.float32 and grad_dtype == hidden.dtype
            # bf16 matmuls round the logits: compare the log-probs at bf16 resolution there.
            torch.testing.assert_close(logps.double(), ref_logps, rtol=0, atol=1e-5 if fp32 else 0.15)
            torch.testing.assert_close(
                grad_h.double(), ref_grad_h, rtol=1e-4 if fp32 else 0.05, atol=1e-5 if fp32 else 0.05
            )
        torch.testing.assert_close(
            grad_w[:VOCAB].double(), ref_grad_w[:VOCAB], rtol=1e-4 if fp32 else 0.05, atol=1e-5 if fp32 else 0.02
        )
    # The chunked head against today's path on the same (bf16-rounded) inputs: same roundings.
    for r in by_rank:
        (a, ga, wa, _), (b, gb, wb, _) = r["chunked"], r["unchunked"]
        torch.testing.assert_close(a, b, rtol=1e-6 if fp32 else 0, atol=1e-6 if fp32 else 1e-3)
        torch.testing.assert_close(ga, gb, rtol=1e-5 if fp32 else 1e-2, atol=1e-6 if fp32 else 1e-2)
        torch.testing.assert_close(wa, wb, rtol=1e-5 if fp32 else 1e-2, atol=1e-6 if fp32 else 1e-2)


def test_chunked_head_rejects_bad_arguments():
    from simpo_megatron.logprobs import chunked_vocab_parallel_token_logps

    hidden, weight, labels = _head_inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_vocab_parallel_token_logps(hidden, weight, labels, VOCAB, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        chunked_vocab_parallel_token_logps(hidden, weight, labels - 100, VOCAB)
