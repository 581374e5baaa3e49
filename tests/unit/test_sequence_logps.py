"""Sequence reduction of token log-probs: masked mean (SimPO) or sum, and no silent NaN."""

import pytest
import torch

from simpo_megatron.logprobs import sequence_logps


def test_average_and_sum_over_response_tokens_only():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -1.5, -9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(sequence_logps(logps, mask), torch.tensor([-2.5, -2.5 / 3]))
    torch.testing.assert_close(sequence_logps(logps, mask, average=False), torch.tensor([-5.0, -2.5]))


def test_gradient_flows_to_masked_tokens_only():
    logps = torch.zeros(1, 4, requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    sequence_logps(logps, mask).sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))


@pytest.mark.parametrize("average", [True, False])
def test_empty_response_is_an_error_not_nan(average):
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"sequences \[1\] have no response token"):
        sequence_logps(torch.zeros(2, 2), mask, average=average)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4))
