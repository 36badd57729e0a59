"""What an adapter changed where it should change nothing: the base's and the adapted model's next-token
distributions on general text that is not the training data, and their greedy answers to general prompts.

- KL(base || adapted) per token, sum over the vocabulary of p_base * (log p_base - log p_adapted): the
  extra nats the adapted model pays where the base was right; mean and p95 over all scored tokens.
- perplexity of both on the same tokens (their ratio: > 1 means the adapted model predicts general text
  worse).
- the share of general prompts whose greedy answer changed at all.

The base is the same model with its adapters disabled (exact, no second copy), or a separate model for a
full fine-tune. Base against itself gives exactly 0 everywhere (tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import adapter_in_use, all_wrappers, disable_adapter
from ..core.modes import eval_mode
from .settings import GENERAL_PROMPTS, ForgettingSettings

__all__ = [
    "GENERAL_PROMPTS",
    "ForgettingSettings",
    "forgetting_metrics",
    "record_log_probs",
    "token_divergence",
]


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


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """General prompts as `deltatune generate` sends them (the one prompt renderer)."""
    from ..data.prompts import PromptRenderer

    renderer = PromptRenderer(tokenizer)
    return [renderer.user_prompt_ids(p) for p in prompts]


@torch.no_grad()
def changed_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, reference: nn.Module | None, new_tokens: int
) -> dict[str, Any]:
    """Greedy answers of the base and the adapted model to `prompts`; the share that differ, with examples."""
    from ..runtime import generate
    from ..runtime.sampling import end_of_sequence_ids

    ids = prompt_ids(tokenizer, prompts)
    eos = end_of_sequence_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    adapter = adapter_in_use(model)

    def answers(m: nn.Module, name: str | None) -> list[list[int]]:
        done = generate(
            m, ids, [name] * len(ids), max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=eos
        )
        return [c.tokens for c in done]

    adapted = answers(model, adapter)
    base = answers(model if reference is None else reference, None)  # a row without an adapter is the base
    changed = [i for i, (a, b) in enumerate(zip(adapted, base, strict=True)) if a != b]
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True).strip()  # noqa: E731
    n = max(len(prompts), 1)
    return {
        "prompts": len(prompts),
        "changed_share": len(changed) / n,
        "first_token_changed_share": sum(a[:1] != b[:1] for a, b in zip(adapted, base, strict=True)) / n,
        "kept_prefix_share": sum(_kept_prefix(a, b) for a, b in zip(adapted, base, strict=True)) / n,
        "examples": [
            {"prompt": prompts[i], "base": decode(base[i]), "adapted": decode(adapted[i])}
            for i in changed[:5]
        ],
    }


def _kept_prefix(adapted: list[int], base: list[int]) -> float:
    """How much of the base's answer the adapted model still gives, from the start: the common prefix's
    length over the base answer's (1.0 when identical). A graded view beside the all-or-nothing change."""
    same = 0
    for a, b in zip(adapted, base, strict=False):
        if a != b:
            break
        same += 1
    return same / len(base) if base else float(not adapted)


def forgetting_metrics(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], prompts: Sequence[str], *,
    reference: nn.Module | None = None, settings: ForgettingSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    """All three measures for `model` against its base; also returns the per-token KL (for the histogram).
    `progress` is told what runs, as it starts."""
    settings = settings or ForgettingSettings()
    with eval_mode(model):
        batches = text_batches(tokenizer, texts[: settings.texts], settings.max_tokens, settings.batch_size)
        scores = token_divergence(model, batches, reference=reference, progress=progress)
        metrics = {"text": divergence_summary(scores)}
        if settings.prompts:
            if progress is not None:
                progress(f"answering {min(settings.prompts, len(prompts))} general prompts with both models")
            metrics["answers"] = changed_answers(
                model, tokenizer, list(prompts)[: settings.prompts], reference=reference,
                new_tokens=settings.new_tokens,
            )  # fmt: skip
    return metrics, scores["kl"]
