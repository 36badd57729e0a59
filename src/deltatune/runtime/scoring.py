"""Log-probabilities of given text: each token of a prompt scored under the model (with its adapter) given the
tokens before it. What an evaluation harness asks a completions server for with `echo` and `logprobs` (the
log-likelihood of a continuation), and what perplexity is made of."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .prompt_pass import PromptPass
from .sampling import TokenLogprob


def prompt_logprobs(
    model: nn.Module, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None], *, top: int = 0
) -> list[list[TokenLogprob]]:
    """For each prompt, its tokens after the first with their log-probabilities given the tokens before them
    (log-softmax of the raw scores) and the `top` most likely tokens at each position. One forward per
    prompt, unpadded, so positions need no care (the server runs long ones in chunks: `PromptPass`); an
    adapter's virtual tokens, if any, come first in its output and are skipped. The model must be in eval mode."""
    if len(prompts) != len(adapters):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter names; give one per prompt")
    scored = []
    for prompt, adapter in zip(prompts, adapters, strict=True):
        run = PromptPass(model, prompt, adapter, top=top, whole=True)
        run.advance(len(prompt))
        scored.append(run.scores)
    return scored
