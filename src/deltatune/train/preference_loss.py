"""The preference objectives' losses from answer log-probabilities (task/objectives.py has the formulas and
their papers). Pure functions of tensors, so each is checked against TRL's on the same numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .answer_logps import AnswerScores


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # the batch's mean loss (what backward runs on)
    chosen_rewards: torch.Tensor  # (pairs,) detached; for KTO the desirable answers'
    rejected_rewards: torch.Tensor  # (pairs,) detached; for KTO the undesirable answers'
    extra: dict[str, float]  # logged beside the loss: nll, kl, log-odds


def preference_loss(
    objective: str,
    settings: dict[str, Any],
    policy: AnswerScores,
    reference: torch.Tensor | None,
    desirable: torch.Tensor | None = None,
) -> PreferenceOutput:
    """`policy`: the model's scores of the batch's rows (chosen then rejected; for KTO answer then mismatched
    partner); `reference`: the reference's summed log-probs of the same rows (None for reference-free ones)."""
    if objective == "kto":
        return _kto(settings, policy, reference, desirable)
    chosen, rejected = policy.logps.chunk(2)
    chosen_tokens, rejected_tokens = policy.tokens.chunk(2)
    if objective in ("orpo", "simpo"):
        return _reference_free(objective, settings, policy, chosen, rejected, chosen_tokens, rejected_tokens)
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    beta = settings["beta"]
    delta = chosen_ratio - rejected_ratio
    if objective == "ipo":  # per completion token, as TRL (confirmed with the IPO authors)
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
        loss, extra = losses.mean(), {}
    else:
        loss, extra = _dpo_losses(settings, delta, chosen, chosen_tokens)
    return PreferenceOutput(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), extra)


def _dpo_losses(
    settings: dict[str, Any], delta: torch.Tensor, chosen: torch.Tensor, chosen_tokens: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss_type, or the weighted sum of a list of them (TRL's multi-loss), and what to log beside it.
    delta: (pairs,) the chosen answer's log-ratio minus the rejected one's."""
    kinds = settings["loss_type"]
    kinds = [kinds] if isinstance(kinds, str) else kinds
    weights = settings["loss_weights"] or [1.0] * len(kinds)
    beta, total, extra = settings["beta"], 0.0, {}
    for kind, weight in zip(kinds, weights, strict=True):
        if kind == "sft":
            term = _chosen_nll(chosen, chosen_tokens)
            extra["nll"] = float(term.detach())
        elif kind == "hinge":
            term = torch.relu(1 - beta * delta).mean()
        elif kind == "robust":
            eps = settings["label_smoothing"]
            term = (
                (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
            ).mean()
        else:
            term = -F.logsigmoid(beta * delta).mean()
        total = total + weight * term
    return total, extra


def _chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen answers' NLL, a token mean over the batch (DPO's sft term, CPO's cpo_alpha term)."""
    return -chosen.sum() / chosen_tokens.sum().clamp(min=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _reference_free(
    objective: str,
    settings: dict[str, Any],
    policy: AnswerScores,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> PreferenceOutput:
    beta = settings["beta"]
    chosen_mean = chosen.float() / chosen_tokens.clamp(min=1)  # per-token mean log-probs
    rejected_mean = rejected.float() / rejected_tokens.clamp(min=1)
    if objective == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
        ratio = F.logsigmoid(log_odds)
        # NLL of the chosen sequences, prompt and answer tokens alike (as TRL's ORPO computes it)
        nll = (policy.prompt_nll - chosen.sum()) / (policy.prompt_tokens + chosen_tokens.sum())
        loss = nll - beta * ratio.mean()
        extra = {"nll": float(nll.detach()), "log_odds": float(log_odds.detach().mean())}
    else:
        eps, gamma = settings["label_smoothing"], settings["simpo_gamma"]
        margin = beta * (chosen_mean - rejected_mean) - gamma
        losses = -F.logsigmoid(margin) * (1 - eps) - F.logsigmoid(-margin) * eps
        loss, extra = losses.mean(), {}
        if settings["cpo_alpha"]:
            nll = _chosen_nll(chosen, chosen_tokens)
            loss = loss + settings["cpo_alpha"] * nll
            extra["nll"] = float(nll.detach())
    return PreferenceOutput(loss, beta * chosen_mean.detach(), beta * rejected_mean.detach(), extra)


def _kto(
    settings: dict[str, Any],
    policy: AnswerScores,
    reference: torch.Tensor,
    desirable: torch.Tensor,
) -> PreferenceOutput:
    beta = settings["beta"]
    logps, partner_logps = policy.logps.chunk(2)
    ref, ref_partner = reference.chunk(2)
    # z: the batch's estimate of KL(policy || reference) from answers paired with other prompts; no gradient
    z = (partner_logps.detach() - ref_partner).mean().clamp(min=0)
    ratio = logps - ref
    good, bad = ratio[desirable], ratio[~desirable]
    losses = torch.cat(
        [
            settings["desirable_weight"] * (1 - torch.sigmoid(beta * (good - z))),
            settings["undesirable_weight"] * (1 - torch.sigmoid(beta * (z - bad))),
        ]
    )
    return PreferenceOutput(losses.mean(), beta * good.detach(), beta * bad.detach(), {"kl": float(z)})


def preference_statistics(out: PreferenceOutput) -> dict[str, float]:
    """What a training step logs beside the loss (TRL's names, with _ for /): the mean rewards of the chosen
    and rejected answers, the share of pairs whose chosen answer has the higher reward, the mean margin."""
    good, bad = out.chosen_rewards.float(), out.rejected_rewards.float()
    stats = {
        "rewards_chosen": float(good.mean()) if len(good) else 0.0,
        "rewards_rejected": float(bad.mean()) if len(bad) else 0.0,
    }
    if len(good) == len(bad) and len(good):
        stats["reward_accuracy"] = float((good > bad).float().mean())
        stats["reward_margin"] = float((good - bad).mean())
    return stats | out.extra
