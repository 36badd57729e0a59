"""What every generation path shares: a row's result, sampling settings and how a next token is chosen from
scores, and left padding. `runtime.decode` (the engine) and `runtime.generate` (its fixed-batch front) use it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

# Temperatures below this would sample from a distribution that is a point mass up to float32 rounding, and
# dividing scores by them overflows: such rows are greedy.
GREEDY_BELOW = 1e-5


@dataclass
class TokenLogprob:
    """A chosen token's log-probability under the model (log-softmax of its raw scores: before penalties,
    temperature and top-p, so it says what the model believes, not how the token was drawn), and the most
    likely tokens at that step, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    tokens: list[int]  # new tokens only, without the end-of-sequence token
    finish_reason: str  # "stop": the model ended the sequence; "length": max_new_tokens reached;
    # "cancelled": ended early on request (stop_rows), tokens up to then
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token, when the row's Sampling asked for them
    stop_token: int | None = None  # the end-of-sequence token that ended a "stop" row (not in `tokens`)


PENALTY_LIMIT = 2.0  # OpenAI's range for presence_penalty and frequency_penalty, either sign
BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias entry, either sign (100 or -100: that token or never it)
TOP_LOGPROBS_LIMIT = 20  # OpenAI's most alternatives per token


@dataclass(frozen=True)
class Sampling:
    """How one row chooses its tokens, OpenAI's settings: temperature and top-p; presence and frequency
    penalties, subtracted from a token's score once it has appeared in the row's new tokens (presence) and
    for each time it has (frequency), before the temperature; and a seed, which gives the row a random
    generator of its own, so its tokens do not depend on what it is batched with. `logit_bias`: (token id,
    bias) pairs added to those tokens' scores at every step, before the penalties. `logprobs` (not a way of
    choosing, but asked per row like one): None, or each new token's log-probability with that many most
    likely alternatives. Invalid values are refused here, before anything runs."""

    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and abs(value) <= PENALTY_LIMIT):
                raise ValueError(
                    f"{name} must be between -{PENALTY_LIMIT} and {PENALTY_LIMIT}, got {value!r}"
                )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if len({token for token, _ in self.logit_bias}) < len(self.logit_bias):
            raise ValueError("logit_bias names a token twice; give each token one bias")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not (math.isfinite(bias) and abs(bias) <= BIAS_LIMIT):
                raise ValueError(
                    f"logit_bias values must be between -{BIAS_LIMIT} and {BIAS_LIMIT}, got {bias!r}"
                )
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= TOP_LOGPROBS_LIMIT
        ):
            raise ValueError(
                f"logprobs must be None or an integer from 0 to {TOP_LOGPROBS_LIMIT}, got {self.logprobs!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def for_choice(self, index: int) -> Sampling:
        """The settings of a prompt's `index`-th choice (OpenAI's n): its own seed, derived from this one (the
        first keeps it), so seeded choices differ from each other and each repeats."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index * 0x9E3779B97F4A7C15) % 2**64)  # a golden-ratio stride

    def normalized(self) -> Sampling:
        """The same choices, said one way: greedy rows drop top-p and seed, which they never use (so rows
        that choose alike compare equal, as the server groups its fixed batches by this)."""
        if not self.greedy:
            return self
        return Sampling(
            0.0, 1.0, self.presence_penalty, self.frequency_penalty, None, self.logprobs, self.logit_bias
        )


class Sampler:
    """One row's `Sampling` and what it keeps between steps: its own random generator when seeded (made on
    the device of its first scores)."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling.normalized()
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.sampling.seed is None or self.sampling.greedy:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.sampling.seed % 2**64)
        return self._generator


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


def check_vocabulary(sampling: Sampling, model: Any) -> None:
    """Refuse a logit bias for a token the model cannot produce (before the row runs, not mid-batch). The
    vocabulary is the model config's `vocab_size` (every transformers model has one)."""
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None)
    if not sampling.logit_bias or vocabulary is None:
        return
    outside = [token for token, _ in sampling.logit_bias if token >= vocabulary]
    if outside:
        raise ValueError(
            f"logit_bias names token ids {outside[:5]} outside the vocabulary (0 to {vocabulary - 1})"
        )


def next_tokens(
    logits: torch.Tensor, samplers: Sequence[Sampler], generated: Sequence[Sequence[int]]
) -> tuple[list[int], dict[int, str]]:
    """Each row's next token, from its last-position scores, its sampler and the tokens it generated so far
    (for the penalties); and the rows (index -> what is wrong) whose scores hold NaN or +inf: no token can be
    chosen from those, greedy or sampled, and the row must fail alone."""
    # One pass over the scores, in float32 (a bf16 vocabulary reduces at half the rate on a CPU): a row's
    # maximum is NaN where it holds a NaN, else +inf where it holds +inf, and its index is the greedy token.
    # (Two isnan/isposinf passes and a bf16 argmax cost 2.8 ms a step at 16 rows of SmolLM2; this 0.7.)
    scores = logits.float()
    best, chosen = scores.max(-1)
    nan, posinf = torch.isnan(best), torch.isposinf(best)
    broken = {i: "NaN" if nan[i] else "infinite" for i in (nan | posinf).nonzero().flatten().tolist()}
    if broken:
        scores = scores.clone()
        scores[list(broken)] = 0.0
        chosen = None
    penalized = _penalize(scores, samplers, generated)
    if penalized is not scores:
        chosen = None
    return _sample(penalized, samplers, chosen).tolist(), broken


def scored(logits: torch.Tensor, samplers: Sequence[Sampler], tokens: list[int]) -> list[TokenLogprob | None]:
    """The chosen tokens' log-probabilities, for the rows that asked (None for the others), from the raw
    scores `next_tokens` was given."""
    rows = [i for i, s in enumerate(samplers) if s.sampling.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(samplers)
    if not rows:
        return out
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    most = max(samplers[i].sampling.logprobs for i in rows)
    best, best_ids = logprobs.topk(most, dim=-1) if most else (None, None)
    for j, i in enumerate(rows):
        k = samplers[i].sampling.logprobs
        top = list(zip(best_ids[j, :k].tolist(), best[j, :k].tolist(), strict=True)) if k else []
        out[i] = TokenLogprob(tokens[i], float(logprobs[j, tokens[i]]), top)
    return out


def _penalize(
    logits: torch.Tensor, samplers: Sequence[Sampler], generated: Sequence[Sequence[int]]
) -> torch.Tensor:
    """OpenAI's logit bias, then its penalties: score + bias - frequency_penalty * count - presence_penalty *
    (count > 0), counting each token in the row's new tokens (not its prompt). Biased tokens are inside the
    vocabulary (`check_vocabulary`, before a row runs)."""
    rows = [
        i
        for i, s in enumerate(samplers)
        if s.sampling.logit_bias or (s.sampling.penalized and len(generated[i]))
    ]
    if not rows:
        return logits
    logits = logits.float().clone()
    vocabulary = logits.shape[-1]
    for i in rows:
        sampling = samplers[i].sampling
        if sampling.logit_bias:
            tokens, biases = zip(*sampling.logit_bias, strict=True)
            logits[i, list(tokens)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        if not (sampling.penalized and len(generated[i])):
            continue
        tokens = torch.as_tensor(list(generated[i]), dtype=torch.long, device=logits.device)
        counts = torch.bincount(tokens, minlength=vocabulary)[:vocabulary].to(logits.dtype)
        logits[i] -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)
    return logits


def _sample(
    logits: torch.Tensor, samplers: Sequence[Sampler], chosen: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy where a row's temperature is 0 (or below GREEDY_BELOW), else a sample from its
    temperature-scaled distribution cut to its top-p nucleus (the fewest most likely tokens whose
    probabilities reach top_p): seeded rows draw from their own generator, the others together from torch's.
    Scores are shifted so each row's best is 0 before scaling, so a tiny temperature gives -inf for the
    others, never inf - inf. `chosen`: each row's argmax of `logits`, where already taken."""
    chosen = logits.argmax(-1) if chosen is None else chosen
    sampled = [i for i, s in enumerate(samplers) if not s.sampling.greedy]
    if not sampled:
        return chosen
    settings = [samplers[i].sampling for i in sampled]
    scale = torch.tensor([s.temperature for s in settings], device=logits.device).unsqueeze(1)
    rows = logits[sampled].float()
    rows = rows - rows.max(-1, keepdim=True).values
    probs = torch.softmax(rows / scale, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    mass_before = ordered.cumsum(-1) - ordered
    cut = torch.tensor([s.top_p for s in settings], device=logits.device).unsqueeze(1)
    nucleus = mass_before < cut
    nucleus[:, 0] = True  # the most likely token always stays (also when top_p rounds to 0 in float32)
    ordered = ordered * nucleus
    generators = [samplers[i].generator(logits.device) for i in sampled]
    draws = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
    shared = [j for j, g in enumerate(generators) if g is None]
    if shared:
        draws[shared] = torch.multinomial(ordered[shared], 1).squeeze(1)
    for j, generator in enumerate(generators):
        if generator is not None:  # one row at a time: its draws must not depend on its neighbours
            draws[j] = torch.multinomial(ordered[j], 1, generator=generator)[0]
    chosen[sampled] = order.gather(-1, draws.unsqueeze(1)).squeeze(1)
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
