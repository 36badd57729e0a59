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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.adapters import adapter_in_use
from ..core.modes import eval_mode
from ..task.kl import divergence_summary, record_log_probs, text_batches, token_divergence
from .settings import GENERAL_PROMPTS, ForgettingSettings

__all__ = [
    "GENERAL_PROMPTS",
    "ForgettingSettings",
    "forgetting_metrics",
    "record_log_probs",
    "token_divergence",
]


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
