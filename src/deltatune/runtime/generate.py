"""Generate for a fixed set of rows, every row with its own adapter: the one entry point that `deltatune
generate`, training evaluation and the server's fallback use.

Rows are planned into as few forwards as possible: every row whose adapter can share a mixed batch (plain
LoRA) or that uses none goes into one batch on the decode engine (`runtime.decode.DecodeBatch`, the same
engine the server's continuous batching runs; here every row joins at the start); a row set that all uses one
adapter runs with that adapter active, the ordinary single-adapter path. Adapters that cannot be mixed
(prompt tuning, IA3, DoRA, ...) and models whose KV cache the engine cannot merge run one batch per adapter
through transformers' `model.generate`, with each row's own token limit and early end. Both paths choose
tokens with the same code (`sampling.next_tokens`), so a seeded row gets the same tokens on either.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..core.adapters import (
    active_adapters,
    adapter_layers,
    disable_adapter,
    merged_adapter_names,
    set_adapter,
)
from ..core.head_input import contiguous_head_input
from .decode import ContinuousBatchingUnsupported, DecodeBatch, NonFiniteOutput
from .mixed import mixable_refusal, mixed_adapters
from .prefix_cache import PrefixCache
from .sampling import (
    Completion,
    Sampler,
    Sampling,
    TokenLogprob,
    check_vocabulary,
    left_pad,
    next_tokens,
    scored,
)

__all__ = ["Completion", "Sampling", "generate", "left_pad", "plan_batches"]

OnToken = Callable[[int, int, "TokenLogprob | None"], None]  # (row, token, its log-probability if asked)


def plan_batches(model: nn.Module, adapters: Sequence[str | None]) -> list[list[int]]:
    """Row indices grouped into batches that can share one forward."""
    return [rows for rows, _ in _plan(model, adapters)]


def _plan(model: nn.Module, adapters: Sequence[str | None]) -> list[tuple[list[int], bool]]:
    """Batches as (rows, whether they form a mixed batch): every row whose adapter can share a mixed batch
    (or that uses none) in one, then one batch per adapter that cannot."""
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
    return ([(mixable, True)] if mixable else []) + [(rows, False) for rows in alone.values()]


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
    """Hands each row's new tokens to `on_token(row, token, logprob)` as `model.generate` produces them, up
    to the row's own end: its end-of-sequence token (not passed on), its token limit, or its cancellation.
    `logprobs`: each row's log-probabilities so far (`_ChooseTokens` adds a step's before it is put here)."""

    def __init__(
        self,
        rows: list[int],
        limits: list[int],
        eos: set[int],
        on_token: OnToken,
        ended_at: dict[int, int],
        logprobs: list[list[TokenLogprob]],
    ) -> None:
        self.rows, self.left, self.eos, self.on_token = rows, [limits[i] for i in rows], eos, on_token
        self.ended_at, self.sent, self.logprobs = ended_at, [0] * len(rows), logprobs
        self.prompt_seen = False
        self.step = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        step, self.step = self.step, self.step + 1
        for j, token in enumerate(value.reshape(-1).tolist()):
            ended = self.ended_at.get(self.rows[j])
            if self.left[j] <= 0 or (ended is not None and self.sent[j] >= ended):
                continue
            if token in self.eos:
                self.left[j] = 0
                continue
            self.left[j] -= 1
            self.sent[j] += 1
            chances = self.logprobs[j]
            self.on_token(self.rows[j], token, chances[step] if step < len(chances) else None)

    def end(self) -> None:
        pass


class _ChooseTokens(LogitsProcessor):
    """Chooses every row's next token with deltatune's own sampling (per-row seed, penalties, top-p) and
    leaves it the only finite score, so `model.generate`, run greedy, takes exactly that token. Scores that
    are NaN or infinite raise `NonFiniteOutput`, as on the engine."""

    def __init__(self, sampling: list[Sampling], adapters: list[str | None], prompt_width: int) -> None:
        self.samplers = [Sampler(settings) for settings in sampling]
        self.adapters, self.prompt_width = adapters, prompt_width
        # each row's log-probabilities, step by step (past a row's end too: cut to its tokens afterwards)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in adapters]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        penalized = any(s.sampling.penalized for s in self.samplers)  # only penalties look back
        generated = input_ids[:, self.prompt_width :].tolist() if penalized else [[]] * len(self.samplers)
        tokens, broken = next_tokens(scores, self.samplers, generated)
        if broken:
            row, what = next(iter(broken.items()))
            raise NonFiniteOutput.of(what, self.adapters[row])
        for row, chance in enumerate(scored(scores, self.samplers, tokens)):
            if chance is not None:
                self.logprobs[row].append(chance)
        chosen = torch.full_like(scores, -math.inf)
        index = torch.tensor(tokens, device=scores.device).unsqueeze(1)
        return chosen.scatter_(1, index, 0.0)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    adapters: Sequence[str | None],
    *,
    max_new_tokens: int | Sequence[int],
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None,
    sampling: Sampling | None = None,
    seeds: Sequence[int] | None = None,
    on_token: OnToken | None = None,
    stop_rows: Callable[[int, list[int]], bool] | None = None,
    continuous: bool = True,
    share_prefixes: bool = True,
) -> list[Completion]:
    """Continue each prompt (token ids) with the adapter named on its row (a model-side adapter name, or
    None for the base). `sampling`: OpenAI's settings, one `Sampling` for every row (None: greedy); its seed
    seeds each row's own generator, so a row's tokens do not depend on its neighbours; `seeds` gives every
    row a seed of its own instead (GRPO's G samples of one prompt). With `logprobs=k` in it, each
    `Completion.logprobs` holds every new token's log-probability and the k most likely tokens at its step.
    The model must be in eval mode.
    `on_token(row, token, logprob)` receives each row's new tokens as they are generated (for streaming),
    with their log-probability when asked (else None); together they are that row's `Completion.tokens`.
    `stop_rows(row, new_tokens)`, asked after every new token with the row's new tokens so far, ends the row
    there when true (its client went away, its stop string appeared), so a batch is not held up by rows
    nobody needs. Each row also ends at its own `max_new_tokens`.

    Rows that can share a mixed batch run on the decode engine (`runtime.decode.DecodeBatch`), where a row
    leaves as soon as it ends; the others, and every row when `continuous` is False (the reference path the
    tests compare with), run through transformers' `model.generate`. A row whose scores turn NaN or
    infinite raises `NonFiniteOutput` on the engine rather than returning tokens chosen from them.
    `share_prefixes`: on the engine, a long prefix that several rows under one adapter share (an instruction
    every row repeats, the copies of one prompt) is run once for them (`runtime.prefill`)."""
    if len(prompts) != len(adapters):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter names; give one per row")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens; every row needs at least one")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    sampling = (sampling or Sampling()).normalized()
    check_vocabulary(sampling, model)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one per row")
    per_row = [sampling] * len(prompts) if seeds is None else [replace(sampling, seed=s) for s in seeds]
    call = _Rows(prompts, adapters, limits, eos, pad_token_id, per_row, on_token, stop_rows, share_prefixes)
    results: dict[int, Completion] = {}
    # merged adapters keep a model off the engine only while they are merged
    engine = continuous and model not in _NOT_CONTINUOUS and not merged_adapter_names(model)
    for rows, mixable in _plan(model, adapters):
        if engine and mixable:
            try:
                results |= _on_engine(model, rows, call)
                continue
            except ContinuousBatchingUnsupported:  # raised before any row got a token
                _NOT_CONTINUOUS[model] = True  # its forward or KV cache: that does not change
        results |= _with_transformers(model, rows, call)
    return [results[i] for i in range(len(prompts))]


# Models whose KV cache the engine cannot merge (found at their first prefill): not tried again.
_NOT_CONTINUOUS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class _Rows:
    """A `generate` call's rows and settings, as its two paths take them."""

    prompts: Sequence[Sequence[int]]
    adapters: Sequence[str | None]
    limits: list[int]
    eos: set[int]
    pad_token_id: int
    sampling: list[Sampling]  # each row's
    on_token: OnToken | None
    stop_rows: Callable[[int, list[int]], bool] | None
    share_prefixes: bool


def _on_engine(model: nn.Module, rows: list[int], call: _Rows) -> dict[int, Completion]:
    """The rows as one continuous batch that starts together and loses each row as it ends."""
    batch = DecodeBatch(
        model,
        pad_token_id=call.pad_token_id,
        eos_token_id=sorted(call.eos),
        capacity=len(rows),
        # this call's own: the weights may change before the next call (a GRPO step trains between rollouts)
        prefixes=PrefixCache(keep_prompts=False) if call.share_prefixes else None,
    )
    steps = batch.add(
        [call.prompts[i] for i in rows],
        [call.adapters[i] for i in rows],
        max_new_tokens=[call.limits[i] for i in rows],
        sampling=[call.sampling[i] for i in rows],
    )
    row_of = {step.row: row for step, row in zip(steps, rows, strict=True)}  # engine handle -> our row
    new: dict[int, list[int]] = {row: [] for row in rows}
    done: dict[int, Completion] = {}
    while steps:
        for step in steps:
            row = row_of[step.row]
            if step.error is not None:
                raise step.error
            if step.token is not None:
                new[row].append(step.token)
                if call.on_token is not None:
                    call.on_token(row, step.token, step.logprob)
            if step.finished is None and call.stop_rows is not None and call.stop_rows(row, new[row]):
                batch.end(step.row)
                done[row] = batch.completion(step.row)
            elif step.finished is not None:
                done[row] = batch.completion(step.row)
        steps = batch.step()
    return done


def _with_transformers(model: nn.Module, rows: list[int], call: _Rows) -> dict[int, Completion]:
    """The rows as one `model.generate` batch: it runs until its longest live row ends."""
    limits, eos = call.limits, call.eos
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad([call.prompts[i] for i in rows], call.pad_token_id))
    ends = _RowsEnd(rows, limits, call.stop_rows, ids.shape[1])
    per_row_ends = call.stop_rows is not None or len({limits[i] for i in rows}) > 1
    adapters = [call.adapters[i] for i in rows]
    choose = _ChooseTokens([call.sampling[i] for i in rows], adapters, ids.shape[1])
    streamer = None
    if call.on_token is not None:
        streamer = _RowStreamer(rows, limits, eos, call.on_token, ends.ended_at, choose.logprobs)
    with _rows_use(model, adapters), contiguous_head_input(model):  # its prefill keeps 1 position per row
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(limits[i] for i in rows),
            pad_token_id=call.pad_token_id,
            eos_token_id=sorted(eos) or None,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([ends]) if per_row_ends else None,
            logits_processor=LogitsProcessorList([choose]),
            do_sample=False,  # `choose` leaves one token per row
        )
    done = {}
    for j, (row, new) in enumerate(zip(rows, out[:, ids.shape[1] :].tolist(), strict=True)):
        ended_at = ends.ended_at.get(row, limits[row])
        done[row] = _finish(new[:ended_at], limits[row], eos, len(call.prompts[row]))
        if ended_at < limits[row] and done[row].finish_reason == "length":
            done[row].finish_reason = "cancelled"
        if call.sampling[row].logprobs is not None:
            done[row].logprobs = choose.logprobs[j][: len(done[row].tokens)]
    return done


def _finish(new: list[int], limit: int, eos: set[int], prompt_tokens: int) -> Completion:
    for position, token in enumerate(new[:limit]):
        if token in eos:
            return Completion(new[:position], "stop", prompt_tokens, stop_token=token)
    return Completion(new[:limit], "length", prompt_tokens)
