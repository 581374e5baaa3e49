"""SimPO loss against the spec's worked examples and an independent float64 computation."""

import math

import pytest
import torch

from simpo_megatron.losses import LOSSES, get_loss, simpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference(c, r, beta, ratio, loss_type, eps, sft):
    """The spec's formulas, written out in float64 Python scalars."""
    logits = (c - r) - ratio
    if loss_type == "sigmoid":
        loss = -_log_sigmoid(beta * logits) * (1 - eps) - _log_sigmoid(-beta * logits) * eps
    else:
        loss = max(0.0, 1 - beta * logits)
    return loss + sft * -c


def test_spec_example_1_basic_sigmoid():
    losses, chosen, rejected = simpo_loss(torch.tensor([-1.2]), torch.tensor([-2.5]), beta=2.0, gamma_beta_ratio=0.5)
    # pi_logratios = 1.3, logits = 0.8, -log(sigmoid(1.6)) = 0.184
    assert losses.item() == pytest.approx(0.184, abs=5e-4)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.6))), rel=1e-6)
    assert chosen.item() == pytest.approx(-2.4) and rejected.item() == pytest.approx(-5.0)


def test_spec_example_2_with_sft():
    """The spec adds 0.1 * 1.2 to its SimPO part. It reuses 0.184 (the beta=2.0 value) for
    that part although example 2 has beta=2.5, for which the part is -log(sigmoid(2.0)) =
    0.1269, so the formula gives 0.2469, not the spec's 0.304. We pin the formula."""
    losses, _, _ = simpo_loss(
        torch.tensor([-1.2]), torch.tensor([-2.5]), beta=2.5, gamma_beta_ratio=0.5, sft_weight=0.1
    )
    simpo_part = -math.log(1 / (1 + math.exp(-2.0)))
    assert simpo_part == pytest.approx(0.1269, abs=5e-5)
    assert losses.item() == pytest.approx(simpo_part + 0.12, rel=1e-6)
    assert losses.item() == pytest.approx(0.2469, abs=5e-5)
    # The spec's 0.304 is its SFT arithmetic on top of example 1's SimPO value.
    assert 0.184 + 0.1 * 1.2 == pytest.approx(0.304)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.0)])
@pytest.mark.parametrize("sft", [0.0, 0.3])
@pytest.mark.parametrize("beta,ratio", [(2.0, 0.5), (10.0, 0.3), (0.5, 0.0)])
def test_matches_formula(loss_type, eps, sft, beta, ratio):
    gen = torch.Generator().manual_seed(0)
    c = -3 * torch.rand(16, generator=gen, dtype=torch.float64)
    r = -3 * torch.rand(16, generator=gen, dtype=torch.float64)
    losses, cr, rr = simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, loss_type=loss_type,
                                label_smoothing=eps, sft_weight=sft)
    expected = [_reference(ci, ri, beta, ratio, loss_type, eps, sft) for ci, ri in zip(c.tolist(), r.tolist())]
    torch.testing.assert_close(losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cr.double(), beta * c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rr.double(), beta * r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_gradient_matches_spec(eps):
    """dL/dlogits = -beta*sigmoid(-beta*logits)*(1-eps) + beta*sigmoid(beta*logits)*eps;
    chosen gets +dL/dlogits, rejected -dL/dlogits; the SFT term adds -sft to chosen."""
    beta, ratio, sft = 2.0, 0.5, 0.25
    c = torch.tensor([-1.2, -0.7, -3.0], requires_grad=True)
    r = torch.tensor([-2.5, -0.9, -1.0], requires_grad=True)
    losses, _, _ = simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps, sft_weight=sft)
    losses.sum().backward()
    logits = (c - r - ratio).detach()
    d = -beta * torch.sigmoid(-beta * logits) * (1 - eps) + beta * torch.sigmoid(beta * logits) * eps
    torch.testing.assert_close(c.grad, d - sft)
    torch.testing.assert_close(r.grad, -d)


def test_hinge_gradient_and_zero_past_margin():
    beta, ratio = 2.0, 0.5
    c = torch.tensor([-1.2, -1.0], requires_grad=True)
    r = torch.tensor([-1.4, -3.0], requires_grad=True)  # logits -0.3 (inside margin), 1.5 (past 1/beta)
    losses, _, _ = simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, loss_type="hinge")
    losses.sum().backward()
    assert losses[1].item() == 0.0 and losses[0].item() == pytest.approx(1 + beta * 0.3)
    torch.testing.assert_close(c.grad, torch.tensor([-beta, 0.0]))
    torch.testing.assert_close(r.grad, torch.tensor([beta, 0.0]))


def test_rewards_are_detached_and_fp32():
    c = torch.tensor([-1.0], dtype=torch.bfloat16, requires_grad=True)
    r = torch.tensor([-2.0], dtype=torch.bfloat16, requires_grad=True)
    losses, cr, rr = simpo_loss(c, r)
    assert losses.dtype == cr.dtype == torch.float32
    assert not cr.requires_grad and not rr.requires_grad and losses.requires_grad


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(loss_type="ipo"), "loss_type"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(label_smoothing=0.6), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(sft_weight=-0.5), "sft_weight"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        simpo_loss(torch.zeros(2), torch.zeros(2), **kwargs)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        simpo_loss(torch.zeros(2), torch.zeros(3))


def test_registry():
    assert get_loss("simpo") is simpo_loss and "simpo" in LOSSES
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        get_loss("dpo")
