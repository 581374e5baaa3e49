"""Preference losses as pure tensor functions.

Every loss takes the policy's per-pair sequence log-probs of the chosen and the rejected
responses and returns ``(losses, chosen_rewards, rejected_rewards)``, one value per pair.
Losses are looked up by name in ``LOSSES`` so that more can be added as small functions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge")
SFT_LOSS_FORMS = ("token", "pair")


def check_simpo_args(
    beta: float,
    loss_type: str,
    label_smoothing: float,
    sft_weight: float,
    name: Callable[[str], str] = str,
) -> None:
    """Raise ValueError unless the SimPO knobs are valid; messages start with the knob's name.

    ``name`` spells an argument in messages: the argument itself by default, a flag for the
    command line (``lambda arg: "--" + arg.replace("_", "-")``).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{name('loss_type')} must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"{name('beta')} must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"{name('label_smoothing')} must be in [0, 0.5], got {label_smoothing}")
    if loss_type == "hinge" and label_smoothing != 0.0:
        raise ValueError(
            f"{name('label_smoothing')} applies to {name('loss_type')} 'sigmoid' only; got it with 'hinge'"
        )
    if sft_weight < 0:
        raise ValueError(f"{name('sft_weight')} must be >= 0, got {sft_weight}")


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024): a reference-free margin loss on sequence log-probs.

    ``logits = (logp_chosen - logp_rejected) - gamma_beta_ratio``;
    sigmoid: ``-logsigmoid(beta*logits)*(1-eps) - logsigmoid(-beta*logits)*eps``;
    hinge: ``relu(1 - beta*logits)``. With ``sft_weight > 0`` the spec's per-pair SFT term
    ``sft_weight * -logp_chosen`` is added to each pair's loss (the reference's token-level
    form is ``sft_token_nll_sum``; training adds one or the other, per ``--sft-loss-form``). ``gamma_beta_ratio`` is the
    paper's gamma/beta (as in the SimPO repository), not TRL's absolute ``simpo_gamma``.
    Rewards are ``beta * logp``, detached. Computed in fp32 whatever the input dtype.
    """
    check_simpo_args(beta, loss_type, label_smoothing, sft_weight)
    if policy_chosen_logps.shape != policy_rejected_logps.shape:
        raise ValueError(
            "policy_chosen_logps and policy_rejected_logps must have the same shape, got "
            f"{tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}"
        )
    chosen = policy_chosen_logps.float()
    rejected = policy_rejected_logps.float()

    logits = (chosen - rejected) - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    else:
        losses = torch.relu(1 - beta * logits)
    if sft_weight > 0:
        losses = losses + sft_weight * -chosen

    chosen_rewards = beta * chosen.detach()
    rejected_rewards = beta * rejected.detach()
    return losses, chosen_rewards, rejected_rewards


def sft_token_nll_sum(
    chosen_token_logps: torch.Tensor, chosen_loss_mask: torch.Tensor, pairs_per_chosen_token: float
) -> torch.Tensor:
    """The token-level SFT term of one micro-batch, as a sum over its pairs' share.

    The SimPO repository (``nn.CrossEntropyLoss`` over the chosen labels) and TRL
    (``cpo_alpha``) take the mean negative log-likelihood over all chosen-response tokens of the
    batch (of each micro-batch on each device, under gradient accumulation or data parallelism;
    here of the global batch). With megatron-core's per-token loss (micro-batch sums, divided once by the global
    pair count P), scaling this micro-batch's token sum by ``P / T`` (T: the chosen-response
    tokens of the global batch) makes the optimized term exactly that mean, whatever the split
    into micro-batches and data-parallel ranks. ``chosen_loss_mask`` may hold 0 for rows that
    do not count (padding pairs).
    """
    if chosen_token_logps.shape != chosen_loss_mask.shape:
        raise ValueError(
            "chosen_token_logps and chosen_loss_mask must have the same shape, got "
            f"{tuple(chosen_token_logps.shape)} and {tuple(chosen_loss_mask.shape)}"
        )
    mask = chosen_loss_mask.float()
    # where(), not only the product: a masked-out (padding) row may hold anything, NaN included.
    nll = -torch.where(mask > 0, chosen_token_logps.float() * mask, 0.0).sum()
    return nll * pairs_per_chosen_token


PreferenceLoss = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

LOSSES: dict[str, PreferenceLoss] = {"simpo": simpo_loss}


def get_loss(name: str) -> PreferenceLoss:
    """The preference loss registered under ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}") from None
