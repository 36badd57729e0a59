"""Log-probabilities of given text: each token of a prompt scored under the model (with its adapter) given the
tokens before it. What an evaluation harness asks a completions server for with `echo` and `logprobs` (the
log-likelihood of a continuation), and what perplexity is made of."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .decode import NonFiniteOutput
from .generate import _rows_use
from .sampling import TokenLogprob


@torch.no_grad()
def prompt_logprobs(
    model: nn.Module, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None], *, top: int = 0
) -> list[list[TokenLogprob]]:
    """For each prompt, its tokens after the first with their log-probabilities given the tokens before them
    (log-softmax of the raw scores) and the `top` most likely tokens at each position. One forward per
    prompt, unpadded, so positions need no care; an adapter's virtual tokens, if any, come first in its
    output and are skipped. The model must be in eval mode."""
    if len(prompts) != len(adapters):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter names; give one per prompt")
    device = next(model.parameters()).device
    scored = []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        if not len(prompt):
            raise ValueError("a prompt has no tokens; every prompt needs at least one")
        ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=device)
        with _rows_use(model, [adapter]):
            logits = model(input_ids=ids).logits[0, -len(prompt) : -1].float()
        if not torch.isfinite(logits).all():
            raise NonFiniteOutput.of("NaN" if torch.isnan(logits).any() else "infinite", adapter)
        logprobs = torch.log_softmax(logits, dim=-1)
        following = ids[0, 1:]
        chosen = logprobs.gather(1, following.unsqueeze(1)).squeeze(1).tolist()
        best, best_ids = logprobs.topk(top, dim=-1) if top else (None, None)
        scored.append([
            TokenLogprob(
                token, chosen[i], list(zip(best_ids[i].tolist(), best[i].tolist(), strict=True)) if top else []
            )
            for i, token in enumerate(following.tolist())
        ])  # fmt: skip
    return scored
