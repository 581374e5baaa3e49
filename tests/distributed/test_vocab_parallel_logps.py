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
    # bf16 logits get bf16 gradients: compare at bf16 resolution.
    atol = 1e-5 if dtype_name == "float32" else 1e-2
    torch.testing.assert_close(grad, ref_logits.grad, rtol=0, atol=atol)
    assert torch.all(grad[..., VOCAB:] == 0)

