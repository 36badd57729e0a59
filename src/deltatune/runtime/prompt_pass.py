"""A prompt run through the model a chunk of tokens at a time, its KV cache kept between chunks.

A server must never let one request hold the model for long: a 2,048-token prompt is seconds of compute on a
CPU, and sixteen of them are minutes. The engine runs a long prompt as a `PromptPass` instead, `advance`-ing
it by a token budget between the decode steps of the rows already answering, so they keep streaming. A pass
either prefills a row that then joins the decode batch (`DecodeBatch.add_prefilled` takes its cache and its
last position's scores) or scores the prompt's own tokens (echo with log-probabilities).

Chunks continue the same causal attention over the cached keys and values, so the result equals one forward
over the whole prompt up to float rounding. An adapter that rewrites the inputs (prompt tuning's virtual
tokens, ...) cannot be cut into chunks: with `whole=True` the first `advance` runs the whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.kv_cache import cache_argument, cache_of, full_dynamic_cache, position_argument
from .decode import NonFiniteOutput
from .generate import _rows_use
from .prefix_cache import PrefixCache
from .sampling import TokenLogprob


class PromptPass:
    """`prompt` (token ids) under `adapter` (the model-side name; None: the base). `top`: None for a prefill
    (only the last position's scores are kept), else score every token after the first with that many
    alternatives (`scores`). The model must be in eval mode; one thread drives a pass."""

    def __init__(
        self,
        model: nn.Module,
        prompt: Sequence[int],
        adapter: str | None,
        *,
        top: int | None = None,
        whole: bool = False,
        prefixes: PrefixCache | None = None,
    ) -> None:
        """`prefixes`: a prefill pass starts after the longest prefix stored there, and stores its prompt
        when done (when the cache keeps prompts)."""
        if not len(prompt):
            raise ValueError("a prompt has no tokens; every prompt needs at least one")
        self.model, self.adapter, self.top, self.whole = model, adapter, top, whole
        self.prompt = list(prompt)
        self.done = 0  # tokens of the prompt in the cache so far
        self.device = next(model.parameters()).device
        self.cache = full_dynamic_cache()
        # scoring needs every position's scores, and a whole pass lets the adapter place the tokens itself
        self.prefixes = prefixes if top is None and not whole else None
        if self.prefixes is not None:
            self._start_after_stored_prefix()
        self.last_logits: torch.Tensor | None = None  # (1, vocab): the scores after the last token run
        self.scores: list[TokenLogprob] = []  # with `top`: each token after the first, in order

    def _start_after_stored_prefix(self) -> None:
        match = self.prefixes.lookup(self.adapter, self.prompt, limit=len(self.prompt) - 1)
        if match is None:
            return
        for layer, (keys, values) in enumerate(zip(match.keys, match.values, strict=True)):
            self.cache.update(keys.unsqueeze(0), values.unsqueeze(0), layer)
        self.done = match.length

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    @torch.no_grad()
    def advance(self, budget: int) -> int:
        """Run the next `budget` tokens (all that remain with `whole`); returns how many ran."""
        if self.finished:
            return 0
        count = self.remaining if self.whole else max(1, min(budget, self.remaining))
        start, end = self.done, self.done + count
        ids = torch.tensor([self.prompt[start:end]], dtype=torch.long, device=self.device)
        extra = {}
        if not self.whole:  # continue the cached positions; `whole` lets the adapter place its own
            extra = {
                "attention_mask": torch.ones(1, end, dtype=torch.long, device=self.device),
                **position_argument(self.model, torch.arange(start, end, device=self.device).unsqueeze(0)),
                "use_cache": True,
                cache_argument(self.model): self.cache,
            }
        with _rows_use(self.model, [self.adapter]):
            out = self.model(input_ids=ids, **extra)
        # an adapter's virtual tokens, if any, come first in the output: the prompt's own are the last
        logits = out.logits[0, -count:].float()
        if not self.whole:
            self.cache = cache_of(out)
        self._check_finite(logits)
        if self.top is not None:
            self._score(logits, start)
        self.last_logits = logits[-1:]
        self.done = end
        if self.finished and self.prefixes is not None and self.prefixes.keep_prompts:
            keys = [layer.keys[0] for layer in self.cache.layers]
            self.prefixes.insert(
                self.adapter, self.prompt, keys, [layer.values[0] for layer in self.cache.layers]
            )
        return count

    def _score(self, logits: torch.Tensor, start: int) -> None:
        """Score the tokens this chunk's positions predict, and the chunk's first token by the scores the
        previous chunk ended with."""
        predicting = logits if start == 0 else torch.cat([self.last_logits, logits])
        following = self.prompt[max(start, 1) : start + len(logits)]
        self.scores += token_scores(predicting[: len(following)], following, self.top or 0)

    def _check_finite(self, logits: torch.Tensor) -> None:
        if not torch.isfinite(logits).all():
            raise NonFiniteOutput.of("NaN" if torch.isnan(logits).any() else "infinite", self.adapter)


def token_scores(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each token's log-probability under the scores of the position before it (log-softmax of the raw
    scores, `logits` (tokens, vocab)), with the `top` most likely tokens there."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.as_tensor(list(tokens), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, index.unsqueeze(1)).squeeze(1).tolist()
    if not top:
        return [TokenLogprob(token, chosen[i], []) for i, token in enumerate(tokens)]
    best, best_ids = logprobs.topk(top, dim=-1)
    return [
        TokenLogprob(token, chosen[i], list(zip(best_ids[i].tolist(), best[i].tolist(), strict=True)))
        for i, token in enumerate(tokens)
    ]
