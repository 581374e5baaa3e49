"""Preference losses as pure tensor functions, in one registry keyed by ``--loss-type``.

A loss reads the policy's per-pair scores (and, for the reference-based ones, the reference
model's) as :class:`PairScores`: summed response log-probs and response token counts, from
which each loss takes the form its definition fixes. It returns a :class:`LossOutput`, one
value per pair. Adding a loss is one pure function and one :class:`PreferenceLoss` entry.

The entries and the TRL 1.16 code each one equals:

- ``sigmoid``, ``hinge``: SimPO (Meng et al., 2024) on averaged log-probs, or summed with
  ``average_log_prob=False``; TRL's ``CPOTrainer(loss_type="simpo")`` for ``sigmoid``.
- ``dpo``: DPO (Rafailov et al., 2023) on summed log-probs, ``DPOTrainer(loss_type="sigmoid")``.
  With ``label_smoothing`` it is conservative DPO (cDPO, Mitchell 2023), TRL < 1.0's
  ``sigmoid`` with ``label_smoothing``; TRL 1.16's ``sigmoid`` ignores label smoothing, and
  cDPO is its ``loss_type=["sigmoid", "robust"]``, ``loss_weights=[2, -1]`` with
  ``label_smoothing = eps / (1 + 2 eps)`` (cDPO is ``-logsigmoid(x) + eps x``, robust DPO
  ``-logsigmoid(x) - e x / (1 - 2e)``). With ``rdpo_alpha`` it is R-DPO (Park et al., 2024),
  which TRL does not have.
- ``ipo``: IPO (Azar et al., 2023) on length-averaged log-ratios, ``DPOTrainer(loss_type="ipo")``.
- ``dpo-norm``: DPO on length-averaged log-ratios, ``DPOTrainer(loss_type="sigmoid_norm")``.
- ``orpo``: ORPO's odds-ratio term (Hong et al., 2024) on averaged log-probs, TRL's
  ``ORPOTrainer.odds_ratio_loss``; ORPO's NLL term is the token-level SFT term with weight 1.
  TRL 1.16's ORPOTrainer takes that NLL over prompt + chosen: ``--sft-on-prompt`` makes the
  SFT term do so, and ``--loss-type orpo --sft-weight 1 --sft-on-prompt`` is TRL's ORPO.
  Without it the term covers the chosen response only, as the SimPO repository's and TRL's
  CPO SFT terms do.

CPO (Xu et al., 2024) and SLiC-HF (Zhao et al., 2023) need no entry: CPO is ``sigmoid`` with
``average_log_prob=False``, ``gamma_beta_ratio=0`` and the token-level SFT term (TRL's
``CPOTrainer(loss_type="sigmoid", cpo_alpha=...)``); SLiC-HF's calibration loss with its
regularizer is ``hinge`` the same way (``CPOTrainer(loss_type="hinge")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F

SIMPO_LOSS_TYPES = ("sigmoid", "hinge")
# Every knob a loss may read, as LossConfig names it.
KNOBS = ("beta", "gamma_beta_ratio", "label_smoothing", "average_log_prob", "rdpo_alpha", "sft_weight")


@dataclass(frozen=True)
class PairScores:
    """One model's scores of m preference pairs: summed response log-probs and token counts.

    All four are ``[m]`` tensors. The policy's log-probs carry autograd; the reference's are
    constants. Counts below 1 are taken as 1 when averaging, as TRL does.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def __post_init__(self):
        shape = self.chosen_logps.shape
        if len(shape) != 1:
            raise ValueError(f"PairScores.chosen_logps must be one value per pair ([m]), got shape {tuple(shape)}")
        for field in ("rejected_logps", "chosen_tokens", "rejected_tokens"):
            if getattr(self, field).shape != shape:
                raise ValueError(
                    f"PairScores.{field} must have chosen_logps' shape {tuple(shape)}, "
                    f"got {tuple(getattr(self, field).shape)}"
                )

    @property
    def chosen_mean_logps(self) -> torch.Tensor:
        """Length-averaged log-prob of each chosen response, in fp32."""
        return self.chosen_logps.float() / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean_logps(self) -> torch.Tensor:
        """Length-averaged log-prob of each rejected response, in fp32."""
        return self.rejected_logps.float() / self.rejected_tokens.clamp(min=1)

    def logps(self, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` log-probs, averaged over the response tokens or summed."""
        if average:
            return self.chosen_mean_logps, self.rejected_mean_logps
        return self.chosen_logps, self.rejected_logps

    def detach(self) -> PairScores:
        return PairScores(
            *(t.detach() for t in (self.chosen_logps, self.rejected_logps, self.chosen_tokens, self.rejected_tokens))
        )


class LossOutput(NamedTuple):
    """Per-pair fp32 losses and rewards (detached); ``metrics``: extra detached per-pair values."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = MappingProxyType({})


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered loss: its pure function and what the trainer and the command line need."""

    name: str
    fn: Callable[..., LossOutput]
    description: str  # one line for --help
    knobs: tuple[str, ...]  # the LossConfig fields ``fn`` reads
    needs_reference: bool
    # The policy log-probs logged as logps/chosen and logps/rejected, as TRL's trainers log them:
    # "sum" (DPOTrainer, whatever its loss type), "mean" (ORPOTrainer), or "flag" (SimPO's,
    # averaged or summed as --average-log-prob says).
    logged_logps: str = "flag"

    def logged(self, policy: PairScores, average_log_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` policy log-probs in the form this loss logs them."""
        average = average_log_prob if self.logged_logps == "flag" else self.logged_logps == "mean"
        return policy.logps(average)

    def compute(self, policy: PairScores, reference: PairScores | None = None, **knobs) -> LossOutput:
        """The loss of each pair. ``knobs`` may name any of ``KNOBS``; those this loss does
        not read are checked (a label smoothing it has no use for is an error) and dropped."""
        check_loss_args(self.name, **knobs)
        if self.needs_reference and reference is None:
            raise ValueError(f"loss {self.name!r} needs the reference model's scores; got reference=None")
        if not self.needs_reference and reference is not None:
            raise ValueError(f"loss {self.name!r} is reference-free; got reference scores")
        if reference is not None:
            if reference.chosen_logps.shape != policy.chosen_logps.shape:
                raise ValueError(
                    f"policy and reference scores must have the same shape, got "
                    f"{tuple(policy.chosen_logps.shape)} and {tuple(reference.chosen_logps.shape)}"
                )
            return self.fn(policy, reference.detach(), **{k: v for k, v in knobs.items() if k in self.knobs})
        return self.fn(policy, **{k: v for k, v in knobs.items() if k in self.knobs})


# ============================================================================ validation
def check_loss_args(loss_type: str, *, name: Callable[[str], str] = str, **knobs) -> None:
    """Raise ValueError unless ``loss_type`` is registered and the given knobs are valid for it.

    Knobs not given are not checked. Messages start with the knob's name, spelled by ``name``:
    the argument itself by default, a flag for the command line
    (``lambda arg: "--" + arg.replace("_", "-")``). ``gamma_beta_ratio`` and ``average_log_prob``
    are read by SimPO only and ignored by the other losses (so that a SimPO configuration
    becomes a DPO one by changing the loss type and beta alone).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"{name('loss_type')} must be one of {LOSS_TYPES}, got {loss_type!r}")
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown loss knobs {unknown}; known: {KNOBS}")
    entry = LOSSES[loss_type]
    beta = knobs.get("beta")
    if beta is not None and not beta > 0:
        raise ValueError(f"{name('beta')} must be > 0, got {beta}")
    label_smoothing = knobs.get("label_smoothing")
    if label_smoothing is not None:
        if not 0.0 <= label_smoothing <= 0.5:
            raise ValueError(f"{name('label_smoothing')} must be in [0, 0.5], got {label_smoothing}")
        if label_smoothing != 0.0 and "label_smoothing" not in entry.knobs:
            users = " or ".join(repr(e.name) for e in LOSSES.values() if "label_smoothing" in e.knobs)
            raise ValueError(
                f"{name('label_smoothing')} applies to {name('loss_type')} {users} only; got it with {loss_type!r}"
            )
    rdpo_alpha = knobs.get("rdpo_alpha")
    if rdpo_alpha is not None:
        if not (rdpo_alpha >= 0 and math.isfinite(rdpo_alpha)):
            raise ValueError(f"{name('rdpo_alpha')} must be >= 0 (0 disables), got {rdpo_alpha}")
        if rdpo_alpha != 0.0 and "rdpo_alpha" not in entry.knobs:
            raise ValueError(
                f"{name('rdpo_alpha')} applies to {name('loss_type')} 'dpo' only; got it with {loss_type!r}"
            )
    sft_weight = knobs.get("sft_weight")
    if sft_weight is not None and sft_weight < 0:
        raise ValueError(f"{name('sft_weight')} must be >= 0, got {sft_weight}")


def check_simpo_args(
    beta: float,
    loss_type: str,
    label_smoothing: float,
    sft_weight: float,
    name: Callable[[str], str] = str,
) -> None:
    """``simpo_loss``'s own check: a SimPO loss type and valid knobs."""
    if loss_type not in SIMPO_LOSS_TYPES:
        raise ValueError(f"{name('loss_type')} must be one of {SIMPO_LOSS_TYPES}, got {loss_type!r}")
    check_loss_args(loss_type, name=name, beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight)


# ============================================================================ the losses
def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-logsigmoid(x)`` with the label flipped with probability ``label_smoothing``."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


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
    hinge: ``relu(1 - beta*logits)``. With ``sft_weight > 0`` the per-pair SFT term
    ``sft_weight * -logp_chosen`` is added to each pair's loss (the token-level form is
    ``sft_token_nll_sum``; training adds one or the other). ``gamma_beta_ratio`` is the
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
        losses = _smoothed_sigmoid_loss(beta * logits, label_smoothing)
    else:
        losses = torch.relu(1 - beta * logits)
    if sft_weight > 0:
        losses = losses + sft_weight * -chosen

    chosen_rewards = beta * chosen.detach()
    rejected_rewards = beta * rejected.detach()
    return losses, chosen_rewards, rejected_rewards


def _simpo(loss_type: str) -> Callable[..., LossOutput]:
    """SimPO of ``loss_type`` on :class:`PairScores`, averaged or summed as ``average_log_prob`` says."""

    def simpo(
        policy: PairScores,
        *,
        beta: float,
        gamma_beta_ratio: float = 0.5,
        label_smoothing: float = 0.0,
        average_log_prob: bool = True,
        sft_weight: float = 0.0,
    ) -> LossOutput:
        chosen, rejected = policy.logps(average_log_prob)
        return LossOutput(
            *simpo_loss(
                chosen,
                rejected,
                beta=beta,
                gamma_beta_ratio=gamma_beta_ratio,
                loss_type=loss_type,
                label_smoothing=label_smoothing,
                sft_weight=sft_weight,
            )
        )

    simpo.__name__ = simpo.__qualname__ = f"simpo_{loss_type}"
    return simpo


def _with_pair_sft(losses: torch.Tensor, policy: PairScores, sft_weight: float) -> torch.Tensor:
    """Adds the per-pair SFT term; reference-based losses take it on the averaged chosen log-prob
    (the length-normalized NLL of RPO and ORPO) whatever log-prob form the loss itself uses."""
    if sft_weight > 0:
        losses = losses + sft_weight * -policy.chosen_mean_logps
    return losses


def _reference_rewards(policy: PairScores, reference: PairScores, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL DPOTrainer's rewards, whatever its loss type: beta x the summed log-ratio."""
    chosen = beta * (policy.chosen_logps.float() - reference.chosen_logps.float()).detach()
    rejected = beta * (policy.rejected_logps.float() - reference.rejected_logps.float()).detach()
    return chosen, rejected


def _averaged_logratios(policy: PairScores, reference: PairScores) -> torch.Tensor:
    """TRL's ipo / sigmoid_norm delta: each summed log-ratio over its response length (the
    policy's counts; the reference scored the same responses)."""
    chosen = (policy.chosen_logps.float() - reference.chosen_logps.float()) / policy.chosen_tokens.clamp(min=1)
    rejected = (policy.rejected_logps.float() - reference.rejected_logps.float()) / policy.rejected_tokens.clamp(min=1)
    return chosen - rejected


def dpo_loss(
    policy: PairScores,
    reference: PairScores,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    rdpo_alpha: float = 0.0,
    sft_weight: float = 0.0,
) -> LossOutput:
    """DPO on summed log-probs; cDPO with ``label_smoothing``; R-DPO with ``rdpo_alpha``.

    ``logits = (pc - rc) - (pr - rr)``; ``z = beta*logits + rdpo_alpha*(|y_c| - |y_r|)``;
    loss ``-logsigmoid(z)*(1-eps) - logsigmoid(-z)*eps``. R-DPO's length term is the R-DPO
    paper's: outside beta, added (a longer chosen response needs less log-ratio margin; the
    implicit reward is ``beta*log-ratio + alpha*|y|``). Rewards: ``beta * (p - r)``.
    """
    chosen_logratios = policy.chosen_logps.float() - reference.chosen_logps.float()
    rejected_logratios = policy.rejected_logps.float() - reference.rejected_logps.float()
    logits = beta * (chosen_logratios - rejected_logratios)
    if rdpo_alpha != 0.0:
        logits = logits + rdpo_alpha * (policy.chosen_tokens.float() - policy.rejected_tokens.float())
    losses = _with_pair_sft(_smoothed_sigmoid_loss(logits, label_smoothing), policy, sft_weight)
    return LossOutput(losses, *_reference_rewards(policy, reference, beta))


def ipo_loss(policy: PairScores, reference: PairScores, *, beta: float, sft_weight: float = 0.0) -> LossOutput:
    """IPO on length-averaged log-ratios: ``(delta - 1/(2*beta))**2``, beta being IPO's tau."""
    delta = _averaged_logratios(policy, reference)
    losses = _with_pair_sft((delta - 1 / (2 * beta)) ** 2, policy, sft_weight)
    return LossOutput(losses, *_reference_rewards(policy, reference, beta))


def dpo_norm_loss(policy: PairScores, reference: PairScores, *, beta: float, sft_weight: float = 0.0) -> LossOutput:
    """DPO on length-averaged log-ratios: ``-logsigmoid(beta * delta)``."""
    delta = _averaged_logratios(policy, reference)
    losses = _with_pair_sft(-F.logsigmoid(beta * delta), policy, sft_weight)
    return LossOutput(losses, *_reference_rewards(policy, reference, beta))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation (split at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: PairScores, *, beta: float, sft_weight: float = 0.0) -> LossOutput:
    """ORPO's odds-ratio term on averaged log-probs: ``-beta * logsigmoid(log_odds)``, with
    ``log_odds = (mc - mr) - (log(1 - e^mc) - log(1 - e^mr))``. Rewards ``beta * m``;
    metrics as TRL logs them: ``log_odds_ratio`` is ``logsigmoid(log_odds)`` and
    ``log_odds_chosen`` is ``log_odds``. An average log-prob of exactly 0 gives an infinite
    log-odds, as in TRL."""
    chosen, rejected = policy.chosen_mean_logps, policy.rejected_mean_logps
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    losses = _with_pair_sft(-beta * ratio, policy, sft_weight)
    metrics = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(), MappingProxyType(metrics))


# ============================================================================ the registry
_SIMPO_KNOBS = ("beta", "gamma_beta_ratio", "average_log_prob", "sft_weight")

LOSSES: dict[str, PreferenceLoss] = {
    e.name: e
    for e in (
        PreferenceLoss(
            "sigmoid",
            _simpo("sigmoid"),
            "SimPO, reference-free: -logsigmoid(beta * (logp_w - logp_l) "
            "- gamma), on averaged log-probs unless --no-average-log-prob.",
            _SIMPO_KNOBS + ("label_smoothing",),
            needs_reference=False,
        ),
        PreferenceLoss(
            "hinge",
            _simpo("hinge"),
            "SimPO's hinge form: relu(1 - beta * (logp_w - logp_l) + gamma).",
            _SIMPO_KNOBS,
            needs_reference=False,
        ),
        PreferenceLoss(
            "dpo",
            dpo_loss,
            "DPO on summed log-ratios (cDPO with --label-smoothing, R-DPO with --rdpo-alpha); needs a reference model.",
            ("beta", "label_smoothing", "rdpo_alpha", "sft_weight"),
            needs_reference=True,
            logged_logps="sum",
        ),
        PreferenceLoss(
            "ipo",
            ipo_loss,
            "IPO on length-averaged log-ratios, beta as tau; needs a reference model.",
            ("beta", "sft_weight"),
            needs_reference=True,
            logged_logps="sum",
        ),
        PreferenceLoss(
            "dpo-norm",
            dpo_norm_loss,
            "DPO on length-averaged log-ratios (TRL's sigmoid_norm); needs a reference model.",
            ("beta", "sft_weight"),
            needs_reference=True,
            logged_logps="sum",
        ),
        PreferenceLoss(
            "orpo",
            orpo_loss,
            "ORPO's odds ratio on averaged log-probs, reference-free; "
            "ORPO (TRL's) is this plus --sft-weight 1 --sft-on-prompt.",
            ("beta", "sft_weight"),
            needs_reference=False,
            logged_logps="mean",
        ),
    )
}
LOSS_TYPES = tuple(LOSSES)


def get_loss(loss_type: str) -> PreferenceLoss:
    """The preference loss registered under ``loss_type``."""
    if loss_type in LOSSES:
        return LOSSES[loss_type]
    raise ValueError(f"unknown loss {loss_type!r}; registered: {sorted(LOSSES)}")


def loss_type_help() -> str:
    """The ``--loss-type`` help text: one line per registered loss."""
    return " ".join(f"'{e.name}': {e.description}" for e in LOSSES.values())


def sft_token_nll_sum(
    chosen_token_logps: torch.Tensor, chosen_loss_mask: torch.Tensor, pairs_per_chosen_token: float
) -> torch.Tensor:
    """The token-level SFT term of one micro-batch, as a sum over its pairs' share.

    The SimPO repository (``nn.CrossEntropyLoss`` over the chosen labels) and TRL
    (``cpo_alpha``; ORPO's NLL term) take the mean negative log-likelihood over all
    chosen-response tokens of the batch (of each micro-batch on each device, under gradient
    accumulation or data parallelism; here of the global batch). With megatron-core's per-token
    loss (micro-batch sums, divided once by the global pair count P), scaling this micro-batch's
    token sum by ``P / T`` (T: the chosen-response tokens of the global batch) makes the
    optimized term exactly that mean, whatever the split into micro-batches and data-parallel
    ranks. ``chosen_loss_mask`` may hold 0 for rows that do not count (padding pairs).
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
