"""The local core attention's pure functions against a direct computation: causal and
sliding-window masks as Hugging Face defines them, soft-capping, grouped-query heads."""

import pytest
import torch

from simpo_megatron.model.attention import causal_window_mask, core_attention
from simpo_megatron.model.layers import softcap


def naive(q, k, v, scale, window=None, cap=None):
    """Per query i, softmax over keys j <= i (and i - j < window) of the (capped) scaled scores."""
    heads, groups = q.shape[1], k.shape[1]
    k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    s = q.shape[2]
    allowed = torch.tensor([[j <= i and (window is None or i - j < window) for j in range(s)] for i in range(s)])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def test_window_mask_is_hf_sliding_window():
    # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window, on top of causal.
    mask = causal_window_mask(6, 6, 3, "cpu")
    assert mask.tolist() == [[i - 3 < j <= i for j in range(6)] for i in range(6)]
    assert causal_window_mask(6, 6, 6, "cpu") is None and causal_window_mask(6, 6, None, "cpu") is None


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("cap", [None, 2.0])
def test_core_attention_matches_a_direct_computation(window, cap):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 7, 8, generator=g, dtype=torch.float64) * 3 for n in (4, 2, 2))
    mask = causal_window_mask(7, 7, window, "cpu")
    out = core_attention(q, k, v, scale=0.3, mask=mask, softcap=cap)
    torch.testing.assert_close(out, naive(q, k, v, 0.3, window, cap))
    if cap is not None:  # the cap bends these scores: without it the result differs
        assert not torch.allclose(out, naive(q, k, v, 0.3, window, None), atol=1e-3)


def test_softcap():
    x = torch.tensor([-100.0, -1.0, 0.0, 1.0, 100.0])
    torch.testing.assert_close(softcap(x, 30.0), 30.0 * torch.tanh(x / 30.0))
    assert softcap(x, 30.0).abs().max() < 30.0
