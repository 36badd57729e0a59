"""GRPO's arithmetic, as TRL's GRPOTrainer defines it (Shao et al. 2024; Liu et al. 2025 for Dr. GRPO; Yu et
al. 2025 for DAPO): group-normalised advantages and the clipped policy loss over completion tokens.

Per completion i of a group of G samples of one prompt, with rewards r:
    A_i = r_i - mean(r of its group), divided by (std + 1e-4) unless scale_rewards is "none" (the std of its
    group, "group"; of the whole batch, "batch"; Bessel-corrected, as TRL's).
Per completion token t, with ratio rho = pi(t) / pi_old(t) (pi_old: the policy that sampled it, which is this
step's policy before its update, so rho = 1 in value and carries only the gradient):
    l_t = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t,
    KL_t = rho * (exp(ref - logp) - (ref - logp) - 1): Schulman's k3 estimate of KL(pi || ref), never negative,
    times the ratio, which is 1 in value but makes the gradient that of an unbiased estimate of the KL under
    the sampling policy (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default).
Reduced by `loss_type`: grpo, the mean over completions of each one's token mean; bnpo, the mean over the
micro-batch's tokens; dr_grpo, the sum over tokens / (completions x max_completion_length); dapo (TRL's
default), the sum over tokens / the step's mean completion tokens per micro-batch (every micro-batch and rank
weighs its tokens alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of rewards ordered group by group (G consecutive completions per prompt), and the share of
    groups whose rewards are all equal (their advantages are 0: nothing to learn from them)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    group_std = grouped.std(1)  # Bessel-corrected
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std.repeat_interleave(group) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    flat = torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()
    return advantages, flat


@dataclass
class GRPOOutput:
    loss: torch.Tensor
    kl: float | None  # mean per-token KL to the reference (beta > 0)
    clip_low: float  # shares of completion tokens whose ratio was clipped (TRL's clip_ratio/*_mean)
    clip_high: float
    clip_region: float


def grpo_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
    mask: torch.Tensor, *, loss_type: str, beta: float, epsilon: float, epsilon_high: float,
    max_completion_length: int, dapo_tokens: float | None = None,
) -> GRPOOutput:  # fmt: skip
    """The loss of one micro-batch (see the module docstring). logps, old_logps, ref_logps, mask: (B, C) over
    completion tokens; advantages: (B,). `dapo_tokens`: completion tokens per micro-batch over the step (dapo)."""
    mask = mask.to(logps.dtype)
    advantages = advantages.to(logps.dtype)[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        diff = ref_logps - logps
        per_token_kl = (torch.exp(diff) - diff - 1) * ratio  # 1 in value: the ratio's gradient is the point
        per_token = per_token + beta * per_token_kl
        kl = _masked_mean(per_token_kl, mask)
    loss = _reduce(per_token * mask, mask, loss_type, max_completion_length, dapo_tokens)
    low = (ratio < 1 - epsilon) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return GRPOOutput(
        loss, kl, _masked_mean(low.to(mask.dtype), mask), _masked_mean(high.to(mask.dtype), mask),
        _masked_mean((low | high).to(mask.dtype), mask),
    )  # fmt: skip


def _reduce(
    losses: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
    dapo_tokens: float | None,
) -> torch.Tensor:  # fmt: skip
    if loss_type == "grpo":
        return (losses.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return losses.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return losses.sum() / (losses.shape[0] * max_completion_length)
    if loss_type == "dapo":
        if dapo_tokens is None:
            raise ValueError("loss_type dapo normalises by the step's tokens: give dapo_tokens")
        return losses.sum() / max(dapo_tokens, 1.0)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values.detach() * mask).sum() / mask.sum().clamp(min=1.0))
