"""The preference losses' values and gradients.

SimPO against two hand-computed examples and an independent float64 computation; DPO, cDPO,
R-DPO, IPO, length-normalized DPO and ORPO against TRL 1.16's own code (its DPOTrainer loss
step and ORPOTrainer's odds-ratio function, run on stand-in objects, no model); the token-level
SFT term through ``loss_func``. The registry's contract and argument checks are in
test_loss_registry.py.
"""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from simpo_megatron.losses import PairScores, get_loss, simpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference(c, r, beta, ratio, loss_type, eps, sft):
    """SimPO's loss (sigmoid or hinge, label smoothing, per-pair SFT term), written out in
    float64 Python scalars."""
    logits = (c - r) - ratio
    if loss_type == "sigmoid":
        loss = -_log_sigmoid(beta * logits) * (1 - eps) - _log_sigmoid(-beta * logits) * eps
    else:
        loss = max(0.0, 1 - beta * logits)
    return loss + sft * -c


def test_example_1_basic_sigmoid():
    losses, chosen, rejected = simpo_loss(torch.tensor([-1.2]), torch.tensor([-2.5]), beta=2.0, gamma_beta_ratio=0.5)
    # pi_logratios = 1.3, logits = 0.8, -log(sigmoid(1.6)) = 0.184
    assert losses.item() == pytest.approx(0.184, abs=5e-4)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.6))), rel=1e-6)
    assert chosen.item() == pytest.approx(-2.4) and rejected.item() == pytest.approx(-5.0)


def test_example_2_with_sft():
    """Example 1's pair at beta=2.5 with sft_weight=0.1: the SimPO part is -log(sigmoid(2.0)) =
    0.1269 and the SFT part 0.1 * 1.2, 0.2469 in all. Reusing example 1's SimPO part (0.184, its
    beta=2.0 value) would give 0.304, which is the total at beta=2.0, not here."""
    losses, _, _ = simpo_loss(
        torch.tensor([-1.2]), torch.tensor([-2.5]), beta=2.5, gamma_beta_ratio=0.5, sft_weight=0.1
    )
    simpo_part = -math.log(1 / (1 + math.exp(-2.0)))
    assert simpo_part == pytest.approx(0.1269, abs=5e-5)
    assert losses.item() == pytest.approx(simpo_part + 0.12, rel=1e-6)
    assert losses.item() == pytest.approx(0.2469, abs=5e-5)
    # 0.304 is the total with example 1's beta of 2.0.
    beta_2_total, _, _ = simpo_loss(
        torch.tensor([-1.2]), torch.tensor([-2.5]), beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1
    )
    assert beta_2_total.item() == pytest.approx(0.304, abs=5e-4)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.0)])
@pytest.mark.parametrize("sft", [0.0, 0.3])
@pytest.mark.parametrize("beta,ratio", [(2.0, 0.5), (10.0, 0.3), (0.5, 0.0)])
def test_matches_formula(loss_type, eps, sft, beta, ratio):
    gen = torch.Generator().manual_seed(0)
    c = -3 * torch.rand(16, generator=gen, dtype=torch.float64)
    r = -3 * torch.rand(16, generator=gen, dtype=torch.float64)
    losses, cr, rr = simpo_loss(
        c, r, beta=beta, gamma_beta_ratio=ratio, loss_type=loss_type, label_smoothing=eps, sft_weight=sft
    )
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


def test_unknown_loss_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        get_loss("kto")


# ---------------------------------------------------------------- reference-based losses and ORPO vs TRL
# TRL 1.16 has no standalone DPO loss function: the loss lives in DPOTrainer._compute_loss, after
# the model's forward. It is run here as it is, on an object made with object.__new__ that holds
# only the attributes the method reads, with a stand-in model whose output carries the given
# token log-probs (zero outside the response, as TRL's fused head gives for the -100 labels) and
# the reference's sums as TRL's precomputed reference log-probs. TRL returns the mean over pairs
# and logs its reward metrics; per-pair values come from one-pair batches.


def _trl_class(module: str, name: str):
    """A TRL trainer class; without TRL the tests fail, never skip."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.x
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError as e:
        pytest.fail(f"TRL is the reference for these losses ({e}); install the test extras: pip install -e '.[test]'")


_ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)


def _trl_dpo(
    loss_type, beta, token_logps, mask, ref_token_logps, label_smoothing=0.0, loss_weights=None, ref_chosen_shift=None
):
    """TRL's DPOTrainer loss step on ``[2m, L]`` token log-probs (chosen rows first):
    (mean loss, logged metrics)."""
    trainer = object.__new__(_trl_class("trl.trainer.dpo_trainer", "DPOTrainer"))
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer.__dict__.update(
        model=SimpleNamespace(training=False),
        accelerator=_ACCELERATOR,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    rows, length = mask.shape
    log_probs = token_logps * mask
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(mask, dtype=torch.bool),
    )
    ref = (ref_token_logps * mask).sum(-1)
    ref_chosen, ref_rejected = ref[: rows // 2], ref[rows // 2 :]
    if ref_chosen_shift is not None:
        ref_chosen = ref_chosen + ref_chosen_shift
    inputs = {  # completion_mask has the prompt's first token in front; TRL shifts it off
        "input_ids": torch.zeros(rows, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, length + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(rows, 1), mask], 1).long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer._compute_loss(lambda **kwargs: outputs, inputs, False)
    return loss, {key: values[-1] for key, values in trainer._metrics["eval"].items()}


def _token_case(seed, pairs=6, length=9):
    """Random fp32 token log-probs of the policy (a leaf) and the reference, and response masks
    of lengths 1..length (chosen rows first)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * pairs, length)
    for row in range(2 * pairs):
        mask[row, : int(torch.randint(1, length + 1, (1,), generator=gen))] = 1.0
    policy = (-3 * torch.rand(2 * pairs, length, generator=gen)).requires_grad_(True)
    reference = -3 * torch.rand(2 * pairs, length, generator=gen)
    return policy, mask, reference


def _scores(token_logps, mask) -> PairScores:
    sums, counts = (token_logps * mask).sum(-1), mask.sum(-1)
    m = mask.shape[0] // 2
    return PairScores(sums[:m], sums[m:], counts[:m], counts[m:])


def _pairs(tensor, k):
    """Rows of pair k (its chosen and its rejected), as a one-pair batch."""
    m = tensor.shape[0] // 2
    return tensor[[k, m + k]]


def _grad(loss, leaf):
    leaf.grad = None
    loss.backward()
    return leaf.grad.clone()


# ours, our knobs, TRL's loss_type, TRL's label_smoothing, TRL's loss_weights
TRL_DPO_CASES = {
    "dpo": ("dpo", dict(beta=0.1), "sigmoid", 0.0, None),
    "dpo-beta1": ("dpo", dict(beta=1.0), "sigmoid", 0.0, None),
    # cDPO = -logsigmoid(x) + eps x = 2 x sigmoid - robust(e) with e / (1 - 2e) = eps.
    "cdpo": ("dpo", dict(beta=0.1, label_smoothing=0.2), ["sigmoid", "robust"], 0.2 / 1.4, [2.0, -1.0]),
    "cdpo-half": ("dpo", dict(beta=0.5, label_smoothing=0.5), ["sigmoid", "robust"], 0.5 / 2.0, [2.0, -1.0]),
    "ipo": ("ipo", dict(beta=0.1), "ipo", 0.0, None),
    "ipo-beta2": ("ipo", dict(beta=2.0), "ipo", 0.0, None),
    "dpo-norm": ("dpo-norm", dict(beta=2.0), "sigmoid_norm", 0.0, None),
    "dpo-norm-beta10": ("dpo-norm", dict(beta=10.0), "sigmoid_norm", 0.0, None),
}


@pytest.mark.parametrize("case", sorted(TRL_DPO_CASES))
def test_reference_losses_equal_trl_dpo_trainer(case):
    """Mean loss, gradient, per-pair losses and TRL's reward metrics, on random log-probs."""
    ours, knobs, trl_type, trl_smoothing, trl_weights = TRL_DPO_CASES[case]
    policy, mask, reference = _token_case(seed=len(case))
    # average_log_prob and gamma_beta_ratio are SimPO's: a reference-based loss ignores them.
    out = get_loss(ours).compute(
        _scores(policy, mask), _scores(reference, mask), **knobs, average_log_prob=True, gamma_beta_ratio=0.5
    )
    grad = _grad(out.losses.mean(), policy)
    trl_loss, trl_metrics = _trl_dpo(trl_type, knobs["beta"], policy, mask, reference, trl_smoothing, trl_weights)
    trl_grad = _grad(trl_loss, policy)

    assert out.losses.dtype == torch.float32 and out.losses.shape == (6,)
    torch.testing.assert_close(out.losses.mean(), trl_loss.detach(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-8)
    assert grad.abs().sum() > 0
    for key, ours_value in [
        ("rewards/chosen", out.chosen_rewards.mean()),
        ("rewards/rejected", out.rejected_rewards.mean()),
        ("rewards/margins", (out.chosen_rewards - out.rejected_rewards).mean()),
        ("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards).float().mean()),
    ]:
        assert ours_value.item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-7), key
    for k in range(6):
        one, _ = _trl_dpo(
            trl_type,
            knobs["beta"],
            _pairs(policy, k),
            _pairs(mask, k),
            _pairs(reference, k),
            trl_smoothing,
            trl_weights,
        )
        assert out.losses[k].item() == pytest.approx(one.item(), rel=2e-6, abs=1e-7), k


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_per_pair_equals_trl_aot_on_one_pair(eps):
    """TRL's aot sorts the log-ratios over the batch, then applies the label-smoothed sigmoid: on
    a one-pair batch it is cDPO with the same label smoothing, with no algebra in between."""
    policy, mask, reference = _token_case(seed=7, pairs=4)
    out = get_loss("dpo").compute(_scores(policy, mask), _scores(reference, mask), beta=0.2, label_smoothing=eps)
    for k in range(4):
        leaf = _pairs(policy, k).detach().requires_grad_(True)
        ours = (
            get_loss("dpo")
            .compute(
                _scores(leaf, _pairs(mask, k)),
                _scores(_pairs(reference, k), _pairs(mask, k)),
                beta=0.2,
                label_smoothing=eps,
            )
            .losses
        )
        ours_grad = _grad(ours.sum(), leaf)
        trl, _ = _trl_dpo("aot", 0.2, leaf, _pairs(mask, k), _pairs(reference, k), eps)
        torch.testing.assert_close(ours, trl.detach().reshape(1), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(ours_grad, _grad(trl, leaf), rtol=1e-5, atol=1e-8)
        assert out.losses[k].item() == pytest.approx(trl.item(), rel=2e-6)


@pytest.mark.parametrize("alpha,eps", [(0.05, 0.0), (0.3, 0.0), (0.05, 0.1)])
def test_rdpo_is_dpo_with_the_length_margin_outside_beta(alpha, eps):
    """R-DPO: -logsigmoid(beta * logratio_margin + alpha * (|y_w| - |y_l|)). TRL has no R-DPO; a
    per-pair constant inside the sigmoid is TRL's DPO with the reference chosen log-probs moved
    by -alpha * (|y_w| - |y_l|) / beta, which checks the placement (outside beta) and the sign with
    TRL's code; and against the paper's formula in float64 scalars."""
    beta = 0.1
    policy, mask, reference = _token_case(seed=11)
    pol, ref = _scores(policy, mask), _scores(reference, mask)
    out = get_loss("dpo").compute(pol, ref, beta=beta, rdpo_alpha=alpha, label_smoothing=eps)
    grad = _grad(out.losses.mean(), policy)
    length_gap = pol.chosen_tokens - pol.rejected_tokens
    assert length_gap.abs().sum() > 0  # the case has pairs of different lengths
    if eps == 0.0:
        trl_loss, trl_metrics = _trl_dpo(
            "sigmoid", beta, policy, mask, reference, ref_chosen_shift=-alpha * length_gap / beta
        )
        torch.testing.assert_close(out.losses.mean(), trl_loss.detach(), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(grad, _grad(trl_loss, policy), rtol=1e-5, atol=1e-8)
    # The paper's rewards stay beta x the summed log-ratio (no length term).
    no_alpha = get_loss("dpo").compute(pol, ref, beta=beta)
    torch.testing.assert_close(out.chosen_rewards, no_alpha.chosen_rewards)
    for k in range(6):
        margin = ((pol.chosen_logps[k] - ref.chosen_logps[k]) - (pol.rejected_logps[k] - ref.rejected_logps[k])).item()
        z = beta * margin + alpha * length_gap[k].item()
        expected = -_log_sigmoid(z) * (1 - eps) - _log_sigmoid(-z) * eps
        assert out.losses[k].item() == pytest.approx(expected, rel=1e-5), k


def test_dpo_worked_example():
    # Worked by hand. beta = 0.1; policy log-probs chosen -10, rejected -15 (summed, 4 and 5
    # tokens); reference -12 and -14.
    #   logits = (-10 - -12) - (-15 - -14) = 2 - (-1) = 3;  beta * logits = 0.3
    #   DPO loss = -log sigmoid(0.3) = log(1 + e^-0.3) = log(1.7408182) = 0.5543552
    #   rewards: chosen 0.1 * 2 = 0.2, rejected 0.1 * -1 = -0.1
    #   d loss / d chosen = -beta * sigmoid(-0.3) = -0.1 * 0.4255575 = -0.04255575; rejected: +0.04255575
    #   cDPO, eps = 0.1: -0.9 log sigmoid(0.3) - 0.1 log sigmoid(-0.3) = 0.5543552 + 0.1 * 0.3 = 0.5843552
    #   R-DPO, alpha = 0.05: z = 0.3 + 0.05 * (4 - 5) = 0.25; loss = log(1 + e^-0.25) = 0.5759394
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-15.0], requires_grad=True)
    policy = PairScores(chosen, rejected, torch.tensor([4]), torch.tensor([5]))
    reference = PairScores(torch.tensor([-12.0]), torch.tensor([-14.0]), torch.tensor([4]), torch.tensor([5]))
    dpo = get_loss("dpo")
    out = dpo.compute(policy, reference, beta=0.1)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.5543552, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.2) and out.rejected_rewards.item() == pytest.approx(-0.1)
    assert chosen.grad.item() == pytest.approx(-0.04255575, abs=1e-7)
    assert rejected.grad.item() == pytest.approx(0.04255575, abs=1e-7)
    assert dpo.compute(policy, reference, beta=0.1, label_smoothing=0.1).losses.item() == pytest.approx(
        0.5843552, abs=1e-6
    )
    assert dpo.compute(policy, reference, beta=0.1, rdpo_alpha=0.05).losses.item() == pytest.approx(0.5759394, abs=1e-6)


def _orpo_logits_case(seed, pairs=6, length=8, vocab=11):
    """Random logits and labels with the prompt marked -100 (TRL's layout, labels not yet shifted);
    some responses made near-certain, so that average log-probs fall on both sides of -log 2."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, length, vocab, generator=gen)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    for row in range(2 * pairs):
        labels[row, : int(torch.randint(1, length - 1, (1,), generator=gen))] = -100
    sure = torch.tensor([0, 2, pairs + 1])  # chosen 0 and 2, rejected 1
    logits[sure, :-1] += 9.0 * torch.nn.functional.one_hot(labels[sure, 1:].clamp(min=0), vocab)
    return logits.requires_grad_(True), labels


def test_orpo_equals_trl_odds_ratio_loss():
    """Our averaged log-probs from summed scores and counts equal TRL's get_batch_logps(average);
    the odds-ratio term, its gradient, the rewards and the two log-odds metrics equal
    ORPOTrainer.odds_ratio_loss (TRL returns beta * logsigmoid, which its loss subtracts)."""
    ORPOTrainer = _trl_class("trl.experimental.orpo.orpo_trainer", "ORPOTrainer")
    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(beta=0.25, accelerator=_ACCELERATOR)
    logits, labels = _orpo_logits_case(seed=3)
    m = labels.shape[0] // 2

    trl_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(
        trl_logps[:m], trl_logps[m:]
    )
    assert ((trl_logps > -math.log(2)).any() and (trl_logps < -math.log(2)).any()).item()  # both branches
    trl_grad = _grad(-trl_losses.mean(), logits)

    shifted = labels[:, 1:]
    mask = (shifted != -100).float()
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
    out = get_loss("orpo").compute(_scores(token_logps, mask), beta=0.25, average_log_prob=False)
    grad = _grad(out.losses.mean(), logits)

    torch.testing.assert_close(out.losses, -trl_losses.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected)
    assert out.metrics["log_odds_ratio"].mean().item() == pytest.approx(trl_ratio.item(), rel=1e-5)
    assert out.metrics["log_odds_chosen"].mean().item() == pytest.approx(trl_log_odds.item(), rel=1e-5)
    assert not any(v.requires_grad for v in out.metrics.values())


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
        loss, n, metrics = loss_func(
            settings, logits.shape[-1], labels[rows], loss_mask[rows], logits[rows], sft_token_scale=token_scale
        )
        total, count, start = total + loss, count + int(n), start + size
        sft_sum += metrics.get("sft_loss", torch.tensor(0.0)).item()
    return total / count, sft_sum / count


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("splits", [(6,), (1, 1, 1, 1, 1, 1), (2, 4), (3, 3)])
def test_token_sft_term_is_the_global_token_mean_over_any_split(single_rank_logps, average, splits):
    from simpo_megatron.config import LossConfig

    logits, labels, loss_mask = _micro_batch_case()
    settings = LossConfig(
        beta=2.5, gamma_beta_ratio=0.5, sft_weight=0.3, sft_loss_form="token", average_log_prob=average
    )
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


def test_one_pair_both_sft_forms_agree(single_rank_logps):
    """One pair, averaged log-probs: the token mean is -logp_chosen, the per-pair term."""
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
    loss_p, n_p, metrics_p = loss_func(
        settings, 11, labels[padded], loss_mask[padded], garbage, pair_weights=torch.tensor([1.0, 1.0, 1.0, 0.0])
    )
    assert int(n) == int(n_p) == 3
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6)
    assert reduce_metrics([metrics_p]) == pytest.approx(reduce_metrics([metrics]), rel=1e-6)
    assert "sft_loss" in reduce_metrics([metrics])
    assert "sft_loss" not in reduce_metrics([loss_func(LossConfig(), 11, labels, loss_mask, logits.clone())[2]])
