"""How far an adapted model's next-token distributions are from its base's: KL(base || adapted) per token,
sum over the vocabulary of p_base * (log p_base - log p_adapted), and both models' negative log-likelihoods.
`deltatune forgetting`, the trainer's forgetting monitor and the KL penalty all measure with these.

The base is the same model with its adapters disabled (exact, no second copy), a separate model for a full
fine-tune, or its log-probabilities recorded before training. Base against itself gives exactly 0 (tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import all_wrappers, disable_adapter


@contextlib.contextmanager
def base_of(model: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The base to compare against: `reference` when given (a full fine-tune's original), else `model`
    with its adapters disabled."""
    if reference is not None:
        yield reference
        return
    if not any(True for _ in all_wrappers(model)):
        raise ValueError("the model has no adapters to disable; pass the original model as `reference`")
    with disable_adapter(model):
        yield model


def text_batches(tokenizer: Any, texts: Sequence[str], max_tokens: int, batch_size: int) -> list[dict]:
    """Right-padded batches of the texts' ids (no special tokens added: plain running text)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    ids = [row for row in ids if len(row) >= 2]  # one token predicts nothing
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def _log_probs(model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the next token at every real position but the last (n, vocab), and the targets."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    keep = mask[:, 1:].bool()
    return F.log_softmax(logits[keep], dim=-1), ids[:, 1:][keep]


@torch.no_grad()
def token_divergence(
    model: nn.Module, batches: list[dict], *, reference: nn.Module | None = None,
    base_log_probs: list[torch.Tensor] | None = None, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Per-token KL(base || adapted) and both models' negative log-likelihoods over `batches`. The base is
    `reference`, or `model` with adapters disabled, or (`base_log_probs`, one tensor per batch) recorded
    earlier, as the trainer's monitor does for a full fine-tune."""
    device = next(model.parameters()).device
    kl, nll_base, nll_adapted = [], [], []
    for i, batch in enumerate(batches):
        if progress is not None:
            progress(f"[{i + 1}/{len(batches)}] scoring text batches with both models")
        if base_log_probs is not None:
            base = base_log_probs[i].to(device)
        else:
            with base_of(model, reference) as base_model:
                base, _ = _log_probs(base_model, batch, device)
        adapted, targets = _log_probs(model, batch, device)
        kl.append((base.exp() * (base - adapted)).sum(-1).clamp_min(0.0).cpu())
        nll_base.append(-base.gather(-1, targets[:, None])[:, 0].cpu())
        nll_adapted.append(-adapted.gather(-1, targets[:, None])[:, 0].cpu())
    if not kl:
        raise ValueError("no text to score: every text is shorter than two tokens")
    return {"kl": torch.cat(kl), "nll_base": torch.cat(nll_base), "nll_adapted": torch.cat(nll_adapted)}


@torch.no_grad()
def record_log_probs(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """The model's next-token log-probabilities on `batches`, on the CPU: the base a later model is
    compared with when the base itself will not exist any more (full fine-tuning)."""
    device = next(model.parameters()).device
    return [_log_probs(model, batch, device)[0].cpu() for batch in batches]


def divergence_summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    kl, base, adapted = scores["kl"], scores["nll_base"], scores["nll_adapted"]
    ppl_base, ppl_adapted = math.exp(float(base.mean())), math.exp(float(adapted.mean()))
    return {
        "tokens": int(kl.numel()),
        "kl_mean": float(kl.mean()),
        "kl_p95": float(torch.quantile(kl.double(), 0.95)),
        "perplexity_base": ppl_base,
        "perplexity_adapted": ppl_adapted,
        "perplexity_ratio": ppl_adapted / ppl_base,
    }


def token_kl(adapted_logits: torch.Tensor, base_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the positions `keep` selects of KL(base || adapted) of the next-token distributions."""
    adapted = F.log_softmax(adapted_logits[keep].float(), dim=-1)
    base = F.log_softmax(base_logits[keep].float(), dim=-1)
    return (base.exp() * (base - adapted)).sum(-1).mean()
