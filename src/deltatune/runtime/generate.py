"""Batched generation where every row may use a different adapter: left padding, the model's KV cache, and
one forward per new token for the whole batch.

Rows are planned into as few forwards as possible: every row whose adapter is plain LoRA (or the base) goes
into one mixed batch (`mixed_adapters`); a row set that all uses one adapter runs with that adapter active,
which is the ordinary single-adapter path; adapters that cannot be mixed (prompt tuning, IA3, DoRA, ...) run
as one batch per adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..core.inject import active_adapters, adapter_layers, disable_adapter, set_adapter
from .mixed import mixable_refusal, mixed_adapters

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


def plan_batches(model: nn.Module, adapters: Sequence[str | None]) -> list[list[int]]:
    """Row indices grouped into batches that can share one forward."""
    layers = list(adapter_layers(model))
    mixable: list[int] = []
    alone: dict[str, list[int]] = {}
    verdicts: dict[str, bool] = {}
    for i, name in enumerate(adapters):
        if name is not None and name not in verdicts:
            verdicts[name] = mixable_refusal(model, name, layers) is None
        if name is None or verdicts[name]:
            mixable.append(i)
        else:
            alone.setdefault(name, []).append(i)
    return ([mixable] if mixable else []) + list(alone.values())


@contextmanager
def _rows_use(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[None]:
    distinct = set(adapters)
    if len(distinct) > 1:
        with mixed_adapters(model, adapters):
            yield
        return
    (only,) = distinct
    if only is None:
        with disable_adapter(model):
            yield
        return
    previous = active_adapters(model)
    set_adapter(model, only)
    try:
        yield
    finally:
        set_adapter(model, previous)


class _RowsEnd(StoppingCriteria):
    """Ends each row at its own token limit or when `cancelled(row, new_tokens)` becomes true, noting how
    many new tokens it had then. `model.generate` knows one limit for the batch and ends rows only at
    end-of-sequence; without this, a batch whose long row has stopped early would run on for its short rows'
    sake, or the other way round. A row that ended may still run along with the rest; its tokens past that
    count are dropped."""

    def __init__(
        self,
        rows: list[int],
        limits: list[int],
        cancelled: Callable[[int, list[int]], bool] | None,
        prompt_width: int,
    ) -> None:
        self.rows, self.limits, self.cancelled, self.prompt_width = rows, limits, cancelled, prompt_width
        self.ended_at: dict[int, int] = {}  # row -> new tokens it has

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids.shape[1] - self.prompt_width
        for j, row in enumerate(self.rows):
            if row in self.ended_at:
                continue
            if new >= self.limits[row] or (
                self.cancelled is not None and self.cancelled(row, input_ids[j, self.prompt_width :].tolist())
            ):
                self.ended_at[row] = min(new, self.limits[row])
        return torch.tensor(
            [r in self.ended_at for r in self.rows], dtype=torch.bool, device=input_ids.device
        )


class _RowStreamer(BaseStreamer):
    """Hands each row's new tokens to `on_token(row, token)` as `model.generate` produces them, up to the
    row's own end: its end-of-sequence token (not passed on), its token limit, or its cancellation."""

    def __init__(
        self,
        rows: list[int],
        limits: list[int],
        eos: set[int],
        on_token: Callable[[int, int], None],
        ended_at: dict[int, int],
    ) -> None:
        self.rows, self.left, self.eos, self.on_token = rows, [limits[i] for i in rows], eos, on_token
        self.ended_at, self.sent = ended_at, [0] * len(rows)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for j, token in enumerate(value.reshape(-1).tolist()):
            ended = self.ended_at.get(self.rows[j])
            if self.left[j] <= 0 or (ended is not None and self.sent[j] >= ended):
                continue
            if token in self.eos:
                self.left[j] = 0
                continue
            self.left[j] -= 1
            self.sent[j] += 1
            self.on_token(self.rows[j], token)

    def end(self) -> None:
        pass


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


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    adapters: Sequence[str | None],
    *,
    max_new_tokens: int | Sequence[int],
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_token: Callable[[int, int], None] | None = None,
    stop_rows: Callable[[int, list[int]], bool] | None = None,
) -> list[Completion]:
    """Continue each prompt (token ids) with the adapter named on its row (a model-side adapter name, or
    None for the base). Greedy at temperature 0, else sampling. The model must be in eval mode.
    `on_token(row, token)` receives each row's new tokens as they are generated (for streaming); together
    they are that row's `Completion.tokens`. `stop_rows(row, new_tokens)`, asked after every new token with
    the row's new tokens so far, ends the row there when true (its client went away, its stop string
    appeared), so a batch is not held up by rows nobody needs. Each row also ends at its own
    `max_new_tokens`: the batch runs only as long as its longest live row."""
    if len(prompts) != len(adapters):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter names; give one per row")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens; every row needs at least one")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    check_sampling([temperature], [top_p])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    if temperature < GREEDY_BELOW:
        sampling = {}
    results: list[Completion | None] = [None] * len(prompts)
    for rows in plan_batches(model, adapters):
        ids, mask = left_pad([prompts[i] for i in rows], pad_token_id)
        ends = _RowsEnd(rows, limits, stop_rows, ids.shape[1])
        per_row_ends = stop_rows is not None or len({limits[i] for i in rows}) > 1
        streamer = _RowStreamer(rows, limits, eos, on_token, ends.ended_at) if on_token else None
        with _rows_use(model, [adapters[i] for i in rows]):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(limits[i] for i in rows),
                pad_token_id=pad_token_id,
                eos_token_id=sorted(eos) or None,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([ends]) if per_row_ends else None,
                **(sampling or {"do_sample": False}),
            )
        for row, new in zip(rows, out[:, ids.shape[1] :].tolist(), strict=True):
            ended_at = ends.ended_at.get(row, limits[row])
            results[row] = _finish(new[:ended_at], limits[row], eos, len(prompts[row]))
            if ended_at < limits[row] and results[row].finish_reason == "length":
                results[row].finish_reason = "cancelled"
    return results  # type: ignore[return-value]


def _finish(new: list[int], limit: int, eos: set[int], prompt_tokens: int) -> Completion:
    for position, token in enumerate(new[:limit]):
        if token in eos:
            return Completion(new[:position], "stop", prompt_tokens)
    return Completion(new[:limit], "length", prompt_tokens)
