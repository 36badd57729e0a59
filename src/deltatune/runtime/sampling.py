"""What every generation path shares: a row's result, sampling settings and how a next token is chosen from
scores, and left padding. `runtime.decode` (the engine) and `runtime.generate` (its fixed-batch front) use it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Temperatures below this would sample from a distribution that is a point mass up to float32 rounding, and
# dividing scores by them overflows: such rows are greedy.
GREEDY_BELOW = 1e-5


@dataclass
class Completion:
    tokens: list[int]  # new tokens only, without the end-of-sequence token
    finish_reason: str  # "stop": the model ended the sequence; "length": max_new_tokens reached;
    # "cancelled": ended early on request (stop_rows), tokens up to then
    prompt_tokens: int


def check_sampling(temperature: Sequence[float], top_p: Sequence[float]) -> None:
    """Refuse sampling settings no row can use (before anything runs): NaN, inf, out of range."""
    for t, p in zip(temperature, top_p, strict=True):
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not (math.isfinite(p) and 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded on the left so every row's next token is in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if len(prompt):
            ids[i, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
    return ids, mask


def next_tokens(
    logits: torch.Tensor, temperature: list[float], top_p: list[float]
) -> tuple[list[int], dict[int, str]]:
    """Each row's next token, and the rows (index -> what is wrong) whose scores hold NaN or +inf: no token
    can be chosen from those, greedy or sampled, and the row must fail alone."""
    nan = torch.isnan(logits).any(-1)
    posinf = torch.isposinf(logits).any(-1)
    broken = {i: "NaN" if nan[i] else "infinite" for i in (nan | posinf).nonzero().flatten().tolist()}
    if broken:
        logits = logits.clone()
        logits[list(broken)] = 0.0
    return _sample(logits, temperature, top_p).tolist(), broken


def _sample(logits: torch.Tensor, temperature: list[float], top_p: list[float]) -> torch.Tensor:
    """Greedy where a row's temperature is 0 (or below GREEDY_BELOW), else a sample from its
    temperature-scaled distribution cut to its top-p nucleus (the fewest most likely tokens whose
    probabilities reach top_p). Scores are shifted so each row's best is 0 before scaling, so a tiny
    temperature gives -inf for the others, never inf - inf."""
    chosen = logits.argmax(-1)
    sampled = [i for i, t in enumerate(temperature) if t >= GREEDY_BELOW]
    if not sampled:
        return chosen
    scale = torch.tensor([temperature[i] for i in sampled], device=logits.device).unsqueeze(1)
    rows = logits[sampled].float()
    rows = rows - rows.max(-1, keepdim=True).values
    probs = torch.softmax(rows / scale, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    mass_before = ordered.cumsum(-1) - ordered
    cut = torch.tensor([top_p[i] for i in sampled], device=logits.device).unsqueeze(1)
    nucleus = mass_before < cut
    nucleus[:, 0] = True  # the most likely token always stays (also when top_p rounds to 0 in float32)
    ordered = ordered * nucleus
    picks = order.gather(-1, torch.multinomial(ordered, 1)).squeeze(1)
    chosen[sampled] = picks
    return chosen


def end_of_sequence_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a row: the model's generation config's (what `model.generate` stops at), else
    the tokenizer's end-of-sequence token."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
