"""The loss registry's contract: entries, PairScores, the calling convention and the argument checks."""

import pytest
import torch

from simpo_megatron.losses import (
    KNOBS,
    LOSS_TYPES,
    LOSSES,
    LossOutput,
    PairScores,
    check_loss_args,
    check_simpo_args,
    get_loss,
    loss_type_help,
    simpo_loss,
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scores(seed, pairs=5, requires_grad=False, dtype=torch.float32) -> PairScores:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40, (2, pairs), generator=gen)
    # Summed log-probs of about -0.3 to -3 per token.
    logps = -(0.3 + 2.7 * torch.rand(2, pairs, generator=gen, dtype=torch.float64)) * tokens
    chosen, rejected = (row.to(dtype).requires_grad_(requires_grad) for row in logps)
    return PairScores(chosen, rejected, tokens[0], tokens[1])


def _reference_for(name: str):
    return _scores(1) if LOSSES[name].needs_reference else None


def test_registry_entries():
    assert LOSS_TYPES == tuple(LOSSES) == ("sigmoid", "hinge", "dpo", "ipo", "dpo-norm", "orpo")
    assert {name for name, e in LOSSES.items() if e.needs_reference} == {"dpo", "ipo", "dpo-norm"}
    for name, entry in LOSSES.items():
        assert entry.name == name and get_loss(name) is entry
        assert set(entry.knobs) <= set(KNOBS) and "beta" in entry.knobs and "sft_weight" in entry.knobs
        assert entry.description and "\n" not in entry.description
        assert f"'{name}'" in loss_type_help()
    assert {n for n, e in LOSSES.items() if "label_smoothing" in e.knobs} == {"sigmoid", "dpo"}
    assert {n for n, e in LOSSES.items() if "rdpo_alpha" in e.knobs} == {"dpo"}
    with pytest.raises(ValueError, match=r"unknown loss 'kto'; registered: \['dpo', 'dpo-norm', 'hinge'"):
        get_loss("kto")


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_outputs_are_fp32_per_pair_with_detached_rewards(name):
    policy = _scores(0, requires_grad=True, dtype=torch.bfloat16)
    out = get_loss(name).compute(policy, _reference_for(name), beta=0.5)
    assert isinstance(out, LossOutput)
    for value in (out.losses, out.chosen_rewards, out.rejected_rewards, *out.metrics.values()):
        assert value.dtype == torch.float32 and value.shape == (5,)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert policy.chosen_logps.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["dpo", "ipo", "dpo-norm"])
def test_the_reference_is_a_constant(name):
    reference = _scores(1, requires_grad=True)
    get_loss(name).compute(_scores(0, requires_grad=True), reference, beta=0.5).losses.sum().backward()
    assert reference.chosen_logps.grad is None and reference.rejected_logps.grad is None


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("average", [True, False])
def test_simpo_entries_are_simpo_loss_on_the_chosen_form(loss_type, average):
    """The entries keep simpo_loss's meaning: averaged (default) or summed log-probs."""
    policy = _scores(2)
    knobs = dict(beta=2.5, gamma_beta_ratio=0.4, sft_weight=0.3)
    if loss_type == "sigmoid":
        knobs["label_smoothing"] = 0.1
    out = get_loss(loss_type).compute(policy, average_log_prob=average, rdpo_alpha=0.0, **knobs)
    if average:
        chosen = policy.chosen_logps / policy.chosen_tokens
        rejected = policy.rejected_logps / policy.rejected_tokens
    else:
        chosen, rejected = policy.chosen_logps, policy.rejected_logps
    expected = simpo_loss(chosen, rejected, loss_type=loss_type, **knobs)
    for ours, theirs in zip(out, expected):
        torch.testing.assert_close(ours, theirs)
    assert dict(out.metrics) == {}
    default = get_loss(loss_type).compute(policy, beta=2.5)
    torch.testing.assert_close(default.chosen_rewards, 2.5 * policy.chosen_logps / policy.chosen_tokens)


@pytest.mark.parametrize("name", ["dpo", "ipo", "dpo-norm", "orpo"])
def test_fixed_form_losses_ignore_simpo_knobs_and_add_the_averaged_pair_sft_term(name):
    policy, reference = _scores(3), _reference_for(name)
    base = get_loss(name).compute(policy, reference, beta=0.5)
    ignored = get_loss(name).compute(policy, reference, beta=0.5, average_log_prob=False, gamma_beta_ratio=3.0)
    torch.testing.assert_close(ignored.losses, base.losses)
    with_sft = get_loss(name).compute(policy, reference, beta=0.5, sft_weight=0.2)
    torch.testing.assert_close(with_sft.losses - base.losses, 0.2 * -policy.chosen_logps / policy.chosen_tokens)


def test_pair_scores_averages_and_clamps_empty_counts_as_trl():
    scores = PairScores(
        torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, 0.0]), torch.tensor([3, 2]), torch.tensor([2, 0])
    )
    torch.testing.assert_close(scores.chosen_mean_logps, torch.tensor([-2.0, -1.0]))
    torch.testing.assert_close(scores.rejected_mean_logps, torch.tensor([-1.5, 0.0]))
    assert scores.logps(average=False)[0] is scores.chosen_logps


@pytest.mark.parametrize("field", ["rejected_logps", "chosen_tokens", "rejected_tokens"])
def test_pair_scores_shape_mismatch_names_the_field(field):
    parts = dict(
        chosen_logps=torch.zeros(3),
        rejected_logps=torch.zeros(3),
        chosen_tokens=torch.ones(3),
        rejected_tokens=torch.ones(3),
    )
    parts[field] = torch.zeros(4)
    with pytest.raises(ValueError, match=f"PairScores.{field}"):
        PairScores(**parts)
    with pytest.raises(ValueError, match=r"one value per pair"):
        PairScores(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))


@pytest.mark.parametrize("name", ["dpo", "ipo", "dpo-norm"])
def test_reference_absent_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"loss '{name}' needs the reference model's scores"):
        get_loss(name).compute(_scores(0), None, beta=0.1)


@pytest.mark.parametrize("name", ["sigmoid", "orpo"])
def test_reference_given_to_a_reference_free_loss_is_an_error(name):
    with pytest.raises(ValueError, match="reference-free"):
        get_loss(name).compute(_scores(0), _scores(1), beta=0.1)


def test_policy_and_reference_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape"):
        get_loss("dpo").compute(_scores(0, pairs=5), _scores(1, pairs=4), beta=0.1)


@pytest.mark.parametrize(
    "loss_type,knobs,needles",
    [
        ("kto", {}, ["--loss-type must be one of", "'kto'"]),
        ("dpo", dict(beta=0.0), ["--beta must be > 0"]),
        ("orpo", dict(beta=-1.0), ["--beta must be > 0"]),
        ("dpo", dict(label_smoothing=0.6), ["--label-smoothing must be in [0, 0.5]"]),
        (
            "hinge",
            dict(label_smoothing=0.1),
            ["--label-smoothing applies to --loss-type 'sigmoid' or 'dpo'", "'hinge'"],
        ),
        ("ipo", dict(label_smoothing=0.1), ["--label-smoothing applies", "'ipo'"]),
        ("dpo-norm", dict(label_smoothing=0.1), ["--label-smoothing applies", "'dpo-norm'"]),
        ("orpo", dict(label_smoothing=0.1), ["--label-smoothing applies", "'orpo'"]),
        ("sigmoid", dict(rdpo_alpha=0.1), ["--rdpo-alpha applies to --loss-type 'dpo' only", "'sigmoid'"]),
        ("ipo", dict(rdpo_alpha=0.1), ["--rdpo-alpha applies", "'ipo'"]),
        ("dpo", dict(rdpo_alpha=-0.1), ["--rdpo-alpha must be >= 0"]),
        ("dpo", dict(rdpo_alpha=float("nan")), ["--rdpo-alpha must be >= 0"]),
        ("dpo", dict(sft_weight=-1.0), ["--sft-weight must be >= 0"]),
    ],
)
def test_check_loss_args_names_the_flag(loss_type, knobs, needles):
    with pytest.raises(ValueError) as error:
        check_loss_args(loss_type, name=flag, **knobs)
    message = str(error.value)
    assert message.startswith("--"), message
    for needle in needles:
        assert needle in message, message


def test_check_loss_args_accepts_what_each_loss_reads_and_ignores_simpo_defaults():
    defaults = dict(
        beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.0, average_log_prob=True, rdpo_alpha=0.0, sft_weight=0.0
    )
    for name in LOSS_TYPES:
        check_loss_args(name, **defaults)
    check_loss_args("dpo", beta=0.1, label_smoothing=0.5, rdpo_alpha=0.2, sft_weight=1.0)
    check_loss_args("sigmoid", label_smoothing=0.25)
    with pytest.raises(ValueError, match="unknown loss knobs \\['gamma'\\]"):
        check_loss_args("dpo", gamma=1.0)


def test_compute_checks_its_knobs():
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' or 'dpo' only"):
        get_loss("ipo").compute(_scores(0), _scores(1), beta=0.1, label_smoothing=0.1)


def test_check_simpo_args_compatibility():
    check_simpo_args(2.0, "sigmoid", 0.1, 0.0)
    with pytest.raises(ValueError, match=r"^--loss-type must be one of \('sigmoid', 'hinge'\), got 'dpo'"):
        check_simpo_args(2.0, "dpo", 0.0, 0.0, name=flag)
    with pytest.raises(ValueError, match="^--label-smoothing applies to --loss-type"):
        check_simpo_args(2.0, "hinge", 0.1, 0.0, name=flag)
