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
    # The spec's 0.304 is what the formula gives with example 1's beta of 2.0.
    spec_total, _, _ = simpo_loss(
        torch.tensor([-1.2]), torch.tensor([-2.5]), beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1
    )
    assert spec_total.item() == pytest.approx(0.304, abs=5e-4)


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


# ---------------------------------------------------------------- the SFT term in loss_func
# One process, no tensor parallelism: loss_func's vocab-parallel log-probs become a plain
# log_softmax (tests/distributed/test_vocab_parallel_logps.py checks that they agree).


@pytest.fixture(autouse=False)
def single_rank_logps(monkeypatch):
    import simpo_megatron.training.step as step

    def token_logps(logits, labels, vocab_size=None):
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)

    monkeypatch.setattr(step, "vocab_parallel_token_logps", token_logps)


def _micro_batch_case(seed=0, pairs=6, seq=7, vocab=11):
    """Random logits, labels and response masks of different lengths, chosen rows first."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, seq, vocab, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=gen)
    loss_mask = torch.zeros(2 * pairs, seq)
    for row in range(2 * pairs):
        start = int(torch.randint(0, seq - 1, (1,), generator=gen))
        length = int(torch.randint(1, seq - start + 1, (1,), generator=gen))
        loss_mask[row, start : start + length] = 1.0
    return logits, labels, loss_mask


def _reference_total(logits, labels, loss_mask, beta, ratio, sft, average):
    """SimPO mean over pairs + sft x nn.CrossEntropyLoss over the chosen labels (SimPO repo, TRL)."""
    m = logits.shape[0] // 2
    logps = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    seq = (logps * loss_mask).sum(-1)
    if average:
        seq = seq / loss_mask.sum(-1)
    simpo = -torch.nn.functional.logsigmoid(beta * ((seq[:m] - seq[m:]) - ratio)).mean()
    ignored = torch.where(loss_mask[:m] > 0, labels[:m], -100)
    ce = torch.nn.CrossEntropyLoss()(logits[:m].double().reshape(-1, logits.shape[-1]), ignored.reshape(-1))
    return simpo + sft * ce, ce


def _split_loss(settings, logits, labels, loss_mask, splits, token_scale):
    """Sum of loss_func over micro-batches of ``splits`` pairs each, / the pair count (megatron)."""
    from simpo_megatron.training.step import loss_func

    m = logits.shape[0] // 2
    total, count, sft_sum, start = 0.0, 0, 0.0, 0
    for size in splits:
        rows = list(range(start, start + size)) + list(range(m + start, m + start + size))
        loss, n, metrics = loss_func(settings, logits.shape[-1], labels[rows], loss_mask[rows], logits[rows],
                                     sft_token_scale=token_scale)
        total, count, start = total + loss, count + int(n), start + size
        sft_sum += metrics.get("sft_loss", torch.tensor(0.0)).item()
    return total / count, sft_sum / count


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("splits", [(6,), (1, 1, 1, 1, 1, 1), (2, 4), (3, 3)])
def test_token_sft_term_is_the_global_token_mean_over_any_split(single_rank_logps, average, splits):
    from simpo_megatron.config import LossConfig

    logits, labels, loss_mask = _micro_batch_case()
    settings = LossConfig(beta=2.5, gamma_beta_ratio=0.5, sft_weight=0.3, sft_loss_form="token",
                            average_log_prob=average)
    token_scale = 6 / loss_mask[:6].sum().item()  # global pairs / global chosen tokens
    leaf = logits.clone().requires_grad_(True)
    ours, sft = _split_loss(settings, leaf, labels, loss_mask, splits, token_scale)
    ours.backward()

    ref_leaf = logits.clone().double().requires_grad_(True)
    expected, ce = _reference_total(ref_leaf, labels, loss_mask, 2.5, 0.5, 0.3, average)
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sft == pytest.approx(ce.item(), rel=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-7)


def test_pair_sft_form_is_the_spec_per_pair_term_and_differs_with_lengths(single_rank_logps):
    from simpo_megatron.config import LossConfig

    logits, labels, loss_mask = _micro_batch_case(seed=1)
    pair = LossConfig(sft_weight=0.3, sft_loss_form="pair")
    none = LossConfig(sft_weight=0.0)
    with_pair, sft_pair = _split_loss(pair, logits, labels, loss_mask, (2, 4), None)
    without, _ = _split_loss(none, logits, labels, loss_mask, (2, 4), None)
    logps = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    chosen = ((logps * loss_mask).sum(-1) / loss_mask.sum(-1))[:6]
    assert sft_pair == pytest.approx(-chosen.mean().item(), rel=1e-5)
    assert (with_pair - without).item() == pytest.approx(0.3 * sft_pair, rel=1e-4)
    _, ce = _reference_total(logits, labels, loss_mask, 2.0, 0.5, 0.3, True)
    assert abs(sft_pair - ce.item()) > 1e-3  # chosen lengths differ: the two forms differ


def test_one_pair_both_sft_forms_agree_spec_example_2_shape(single_rank_logps):
    """One pair, averaged log-probs: the token mean is -logp_chosen, the spec's per-pair term."""
    from simpo_megatron.config import LossConfig

    logits, labels, loss_mask = _micro_batch_case(seed=2, pairs=1)
    values = [
        _split_loss(LossConfig(beta=2.5, sft_weight=0.1, sft_loss_form=form), logits, labels, loss_mask, (1,), None)
        for form in ("token", "pair")
    ]
    assert values[0][0].item() == pytest.approx(values[1][0].item(), rel=1e-6)
    assert values[0][1] == pytest.approx(values[1][1], rel=1e-6)


def test_padding_pairs_count_for_nothing(single_rank_logps):
    """A zero-weight pair (evaluation pads a partial micro-batch with one) changes no sum."""
    from simpo_megatron.config import LossConfig
    from simpo_megatron.training.step import loss_func, reduce_metrics

    logits, labels, loss_mask = _micro_batch_case(seed=3, pairs=3)
    settings = LossConfig(sft_weight=0.2)
    loss, n, metrics = loss_func(settings, 11, labels, loss_mask, logits.clone())
    padded = [0, 1, 2, 0, 3, 4, 5, 3]  # pair 0 again as a fourth, padding pair
    garbage = logits.clone()[padded]
    garbage[3] = float("nan")  # whatever the padding row's logits, they must not leak
    garbage[7] = float("nan")
    loss_p, n_p, metrics_p = loss_func(settings, 11, labels[padded], loss_mask[padded], garbage,
                                       pair_weights=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert int(n) == int(n_p) == 3
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)
    assert reduce_metrics([metrics_p]) == pytest.approx(reduce_metrics([metrics]), rel=1e-6)
    assert "sft_loss" in reduce_metrics([metrics])
    assert "sft_loss" not in reduce_metrics([loss_func(LossConfig(), 11, labels, loss_mask, logits.clone())[2]])
