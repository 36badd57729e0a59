"""Log-probabilities of answers given their prompt, for the preference objectives: per row, the sum over the
answer's tokens of log p(token | prompt, earlier answer tokens), and the number of those tokens.

A batch holds B prompts and, for each, `answers_per_prompt` answers (chosen and rejected; or KTO's answer and
its mismatched partner). Rows are ordered answer-set first: row r continues prompt r % B. Two ways to run it:

- prompt once (`prompt_once`): the B prompts go through the model once, right-padded, with a KV cache; the
  cache is repeated for every answer set and the answers continue from it, at the positions after each prompt,
  attending to the prompt's real tokens only. Gradients reach the prompt forward through the cache. The prompt's
  forward and backward are paid once per prompt instead of once per answer: for short answers after a long
  prompt (a chat template, a system prompt, an instruction), nearly half the work of a pair.
- whole rows: each row is prompt + answer, one forward. For what cannot carry a KV cache between two calls
  (DDP and FSDP take one forward per backward, activation checkpointing recomputes it, virtual tokens go first).

Either way the output head runs only on the positions that predict an answer token (and, for ORPO's NLL, a
prompt token), where the model allows the head to be skipped (task/head_loss.py); the log-probabilities are
the same on both paths up to float rounding (tests/test_preference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ..core.kv_cache import cache_argument
from ..data.formats import Example
from ..task.head_loss import fusable_head, head_input


@dataclass
class AnswerBatch:
    prompt_ids: torch.Tensor  # (B, P) right-padded
    prompt_mask: torch.Tensor  # (B, P)
    answer_ids: torch.Tensor  # (B * answers_per_prompt, C) right-padded
    answer_mask: torch.Tensor  # (B * answers_per_prompt, C)
    desirable: torch.Tensor | None = None  # (B,) bool, KTO

    @property
    def prompts(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def answers_per_prompt(self) -> int:
        return self.answer_ids.shape[0] // self.prompt_ids.shape[0]

    def to(self, device: torch.device) -> AnswerBatch:
        moved = {k: None if v is None else v.to(device) for k, v in vars(self).items()}
        return AnswerBatch(**moved)

    def tokens(self) -> int:
        return int(self.prompt_mask.sum()) + int(self.answer_mask.sum())


@dataclass
class AnswerScores:
    logps: torch.Tensor  # (rows,) summed answer-token log-probabilities
    tokens: torch.Tensor  # (rows,) answer tokens per row
    prompt_nll: torch.Tensor | None = None  # summed NLL of the first answer set's prompt tokens (ORPO)
    prompt_tokens: int = 0
    token_logps: torch.Tensor | None = None  # (rows, C) each answer token's own, 0 at padding (`per_token`)


def collate_answers(
    examples: list[Example], pad_id: int, partners: list[Example] | None = None
) -> AnswerBatch:
    """Prompts and answers of `examples`: chosen then rejected for pairs; for KTO (`partners` given) each
    answer, then each partner's answer after the same prompt (the mismatched pair of KTO's KL estimate)."""
    prompts = [e.prompt_ids for e in examples]
    answers = [e.input_ids[len(e.prompt_ids) :] for e in examples]
    if partners is not None:
        answers += [p.input_ids[len(p.prompt_ids) :] for p in partners]
    elif examples[0].rejected_ids is not None:
        answers += [e.rejected_ids for e in examples]
    prompt_ids, prompt_mask = right_padded(prompts, pad_id)
    answer_ids, answer_mask = right_padded(answers, pad_id)
    desirable = None
    if examples[0].desirable is not None:
        desirable = torch.tensor([bool(e.desirable) for e in examples])
    return AnswerBatch(prompt_ids, prompt_mask, answer_ids, answer_mask, desirable)


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one right-padded (ids, attention mask) pair."""
    width = max(1, max(map(len, rows)))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def answer_log_probs(
    model: nn.Module, batch: AnswerBatch, *, prompt_once: bool, prompt_nll: bool = False,
    per_token: bool = False, temperature: float = 1.0,
) -> AnswerScores:  # fmt: skip
    """Per-row answer log-probabilities of `model` on `batch` (see the module docstring). `per_token`: also
    each answer token's (GRPO's ratio is per token); `temperature`: of the distribution the tokens are scored
    under (GRPO scores its samples under the temperature they were drawn at, as TRL does)."""
    if prompt_once:
        scores = _prompt_once(model, batch, prompt_nll, temperature)
    else:
        scores = _whole_rows(model, batch, prompt_nll, temperature)
    if not per_token:
        scores.token_logps = None
    return scores


class _Outputs:
    """A forward's last hidden states with the head skipped (where the head may be), or its logits; `logits`
    turns a selection of positions into their logits."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> None:
        self.head = fusable_head(model, ids)
        if self.head is None:
            self.states, self.cache = _call(model, ids, kwargs)
            return
        with head_input(self.head) as seen:
            _, self.cache = _call(model, ids, kwargs)
        self.states = seen.hidden

    def logits(self, picked: torch.Tensor) -> torch.Tensor:
        logits = picked if self.head is None else self.head(picked)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in fp32 at least


def _call(model: nn.Module, ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    out = model(input_ids=ids, **kwargs)
    # virtual tokens (prompt tuning) come first in the output: the last positions are the inputs'
    return out.logits[:, -ids.shape[1] :], kwargs.get(cache_argument(model))


def _token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _prompt_once(model: nn.Module, batch: AnswerBatch, prompt_nll: bool, temperature: float) -> AnswerScores:
    b, n = batch.prompts, batch.answers_per_prompt
    lengths = batch.prompt_mask.sum(1)
    name = cache_argument(model)
    prompt = _Outputs(
        model, batch.prompt_ids, attention_mask=batch.prompt_mask, use_cache=True, **{name: DynamicCache()}
    )
    for layer in prompt.cache.layers:  # every answer set continues the same prompts
        layer.keys, layer.values = layer.keys.repeat(n, 1, 1, 1), layer.values.repeat(n, 1, 1, 1)
    rows, width = batch.answer_ids.shape
    positions = lengths.repeat(n)[:, None] + torch.arange(width, device=lengths.device)
    mask = torch.cat([batch.prompt_mask.repeat(n, 1), batch.answer_mask], dim=1)
    answers = _Outputs(
        model, batch.answer_ids, attention_mask=mask, position_ids=positions, use_cache=True,
        **{name: prompt.cache},
    )  # fmt: skip
    row = torch.arange(rows, device=lengths.device)
    first = prompt.states[
        row % b, lengths.repeat(n) - 1
    ]  # the prompt's last token predicts the first answer token
    first_logps = _token_logps(prompt.logits(first), batch.answer_ids[:, 0], temperature)
    first_logps = first_logps * batch.answer_mask[:, 0]
    follows = batch.answer_mask[:, 1:].bool()  # answer position t predicts answer token t + 1
    rest = _token_logps(
        answers.logits(answers.states[:, :-1][follows]), batch.answer_ids[:, 1:][follows], temperature
    )
    later = torch.zeros(follows.shape, dtype=rest.dtype, device=rest.device).masked_scatter(follows, rest)
    scores = AnswerScores(first_logps + later.sum(1), batch.answer_mask.sum(1))
    scores.token_logps = torch.cat([first_logps[:, None].to(later.dtype), later], dim=1)
    if prompt_nll:
        inside = batch.prompt_mask[:, 1:].bool()
        nll = -_token_logps(
            prompt.logits(prompt.states[:, :-1][inside]), batch.prompt_ids[:, 1:][inside]
        ).sum()
        scores.prompt_nll, scores.prompt_tokens = nll, int(inside.sum())
    return scores


def whole_rows(batch: AnswerBatch, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row as prompt + answer, right-padded: (ids, attention mask, answer mask over the same positions)."""
    b, n = batch.prompts, batch.answers_per_prompt
    lengths = batch.prompt_mask.sum(1).repeat(n)
    answer_lengths = batch.answer_mask.sum(1)
    rows = batch.answer_ids.shape[0]
    width = int((lengths + answer_lengths).max())
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=lengths.device)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids)
    for r in range(rows):
        p, a = int(lengths[r]), int(answer_lengths[r])
        ids[r, :p] = batch.prompt_ids[r % b, :p]
        ids[r, p : p + a] = batch.answer_ids[r, :a]
        mask[r, : p + a] = 1
        answer[r, p : p + a] = 1
    return ids, mask, answer


def _whole_rows(model: nn.Module, batch: AnswerBatch, prompt_nll: bool, temperature: float) -> AnswerScores:
    ids, mask, answer = whole_rows(batch)
    out = _Outputs(model, ids, attention_mask=mask)
    predicts = answer[:, 1:].bool()  # position t predicts token t + 1
    if prompt_nll:  # the first answer set's prompt tokens too, for ORPO's NLL over the whole chosen sequence
        prompt_part = (mask[:, 1:].bool() & ~predicts) & (
            torch.arange(ids.shape[0], device=ids.device) < batch.prompts
        )[:, None]
        predicts_all = predicts | prompt_part
    else:
        predicts_all = predicts
    token_logps = _token_logps(
        out.logits(out.states[:, :-1][predicts_all]), ids[:, 1:][predicts_all], temperature
    )
    full = torch.zeros(predicts_all.shape, dtype=token_logps.dtype, device=ids.device)
    full = full.masked_scatter(predicts_all, token_logps)
    scores = AnswerScores((full * predicts).sum(1), answer.sum(1))
    # each answer's tokens in order, moved to the answer's own columns (rows, C)
    scores.token_logps = torch.zeros(
        batch.answer_mask.shape, dtype=full.dtype, device=ids.device
    ).masked_scatter(batch.answer_mask.bool(), full[predicts])
    if prompt_nll:
        scores.prompt_nll, scores.prompt_tokens = -(full * prompt_part).sum(), int(prompt_part.sum())
    return scores
