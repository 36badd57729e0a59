"""Continuous batching: rows decode together, one token per row per step, and join or leave between steps.

`runtime.generate` runs a fixed batch until its last row ends, so a request arriving meanwhile waits for the
whole batch, and a batch whose rows end at different times keeps computing for the ones still going. A
`DecodeBatch` keeps the rows' KV cache itself instead:
- new rows are prefilled as a mixed batch of their own and merged into the running cache, both sides padded
  on the left to a common length (the attention mask hides the padding; positions are passed per row);
- a row that ends (end-of-sequence, its token limit, or `end(row)`) leaves the batch at once, and columns no
  live row needs any more are cut from the front of the cache;
- each step is one forward for all live rows, every row with its own LoRA adapter (`mixed.RowUpdates`,
  whose per-row stacks change in place as rows join and leave) and its own sampling settings.

Rows must use plain LoRA adapters (or none) and the model a `DynamicCache` of plain layers (most decoder-only
transformers); `DecodeBatch.add` refuses others with `ContinuousBatchingUnsupported`. Sampling uses the row's
own `Sampling` only: processors from the model's generation_config (repetition penalty, ...) are not applied,
as a request states its own settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..core.adapters import activated, all_wrappers, merged_adapter_names
from ..core.errors import DeltatuneError
from ..core.kv_cache import cache_argument, cache_of, position_argument, positions_from_mask, takes_positions
from .decode_attention import attending_in_float32, decode_kv_dtype
from .kv_room import with_room
from .mixed import MixedBatchError, RowUpdates, StackWorkspace, check_mixable
from .prefill import model_device, pad_left, prefill
from .prefix_cache import PrefixCache
from .sampling import (
    Completion,
    Sampler,
    Sampling,
    TokenLogprob,
    check_vocabulary,
    next_tokens,
    scored,
)

if TYPE_CHECKING:
    from .prompt_pass import PromptPass


class ContinuousBatchingUnsupported(MixedBatchError):
    """This model or adapter cannot join a continuous batch; run it through `runtime.generate`."""


class NonFiniteOutput(DeltatuneError, ArithmeticError):
    """A row's next-token scores hold NaN or +inf: its adapter's weights or config are broken."""

    what: str = ""  # "NaN" or "infinite", so a caller can say it again under another adapter name

    @classmethod
    def of(cls, what: str, adapter: str | None) -> NonFiniteOutput:
        """`what`: "NaN" or "infinite"; `adapter`: the name the caller knows it by."""
        if adapter is None:
            error = cls(f"the base model's next-token scores for this request are {what}")
        else:
            error = cls(
                f"the next-token scores with adapter {adapter!r} are {what}: its weights or config (lora_alpha, "
                "...) are broken. Re-train or re-export it"
            )
        error.what = what
        return error


@dataclass
class Step:
    """What one row got from `add` or `step`: its new token (None when the row ended at end-of-sequence) and
    its finish reason once it has ended ("stop", "length", or "error": the row's scores were not finite and
    it left the batch; `error` says why)."""

    row: int
    token: int | None
    finished: str | None = None
    error: Exception | None = None
    logprob: TokenLogprob | None = None  # the token's, when the row's Sampling asks for log-probabilities


@dataclass
class _Row:
    handle: int
    adapter: str | None
    limit: int
    sampler: Sampler
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # kept when the row's Sampling asks for them
    stop_token: int | None = None  # the end-of-sequence token it ended at


class DecodeBatch:
    """The live rows of one model, decoded together. Not thread-safe: one thread drives it (the engine's)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None,
        capacity: int = 16,
        prefixes: PrefixCache | None = None,
    ) -> None:
        """`capacity`: the rows the LoRA stacks make room for up front (more are fine, at one rebuild).
        `prefixes`: prompt prefixes to reuse and add to (`runtime.prefix_cache`); None: every row runs whole."""
        if model.training:
            raise MixedBatchError("decoding is for inference; call model.eval() first")
        self.model = model
        self.device = model_device(model)
        self.pad_token_id = pad_token_id
        self.eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        self.rows: list[_Row] = []  # in batch order
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length): 1 where the cache holds a real token
        self.finished: dict[int, Completion] = {}  # ended rows' results, until taken with `completion`
        self.capacity = capacity
        self.prefixes = prefixes
        self._updates: RowUpdates | None = None  # the per-row LoRA stacks, in the rows' order
        self._wrappers: list[nn.Module] = []  # the model's adapter wrappers, collected at each join
        self._workspace = StackWorkspace()
        self._handles = 0
        # float32 for a half-precision model on a CPU: its steps attend in float32 (runtime.decode_attention)
        self._kv_dtype = decode_kv_dtype(model)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def adapters(self) -> set[str | None]:
        return {r.adapter for r in self.rows}

    @property
    def stack_bytes(self) -> int:
        """Memory held by the per-row LoRA stacks (room for `capacity` rows, kept between batches)."""
        return self._workspace.nbytes()

    # ---- rows joining ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(
        self,
        prompts: Sequence[Sequence[int]],
        adapters: Sequence[str | None],
        *,
        max_new_tokens: Sequence[int],
        sampling: Sequence[Sampling] | None = None,
    ) -> list[Step]:
        """Prefill new rows and merge them into the batch; returns each one's first token. Their handles are
        the `row` of those steps. `sampling`: each row's settings (None: all greedy). Refuses (changing
        nothing) rows it cannot take."""
        sampling = list(sampling) if sampling is not None else [Sampling()] * len(prompts)
        layers = self.check_joinable(prompts, adapters, max_new_tokens, sampling)
        wrappers = [w for _, w in all_wrappers(self.model)]
        done = prefill(self.model, prompts, adapters, pad_token_id=self.pad_token_id, prefixes=self.prefixes)
        prompt_tokens = [len(p) for p in prompts]
        return self._enter(done.cache, done.mask, done.last_logits, prompt_tokens, adapters, max_new_tokens,
                           sampling, layers, wrappers)  # fmt: skip

    @torch.no_grad()
    def add_prefilled(
        self, prefilled: PromptPass, *, max_new_tokens: int, sampling: Sampling | None = None
    ) -> list[Step]:
        """A row whose prompt ran as a `PromptPass` (in chunks, between steps) joins the batch with that
        pass's cache; returns its first token, as `add` does."""
        if not prefilled.finished or prefilled.top is not None or prefilled.whole:
            raise ValueError("only a finished prefill pass (top=None, whole=False) can join the batch")
        sampling = sampling or Sampling()
        prompt, adapter = prefilled.prompt, prefilled.adapter
        layers = self.check_joinable([prompt], [adapter], [max_new_tokens], [sampling])
        mask = torch.ones(1, len(prompt), dtype=torch.long, device=self.device)
        wrappers = [w for _, w in all_wrappers(self.model)]
        return self._enter(prefilled.cache, mask, prefilled.last_logits, [len(prompt)], [adapter],
                           [max_new_tokens], [sampling], layers, wrappers)  # fmt: skip

    def check_joinable(
        self,
        prompts: Sequence[Sequence[int]],
        adapters: Sequence[str | None],
        max_new_tokens: Sequence[int],
        sampling: Sequence[Sampling],
    ) -> list:
        """Refuse rows the batch cannot take (ContinuousBatchingUnsupported: run them through
        `runtime.generate`); returns the adapter layers their updates live in."""
        count = len(prompts)
        if len(adapters) != count or len(max_new_tokens) != count or len(sampling) != count:
            raise ValueError("give one adapter name, one max_new_tokens and one Sampling per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens; every row needs at least one")
        if any(n < 1 for n in max_new_tokens):
            raise ValueError("max_new_tokens must be at least 1 for every row")
        for settings in sampling:
            check_vocabulary(settings, self.model)
        try:
            layers = check_mixable(self.model, adapters)
        except MixedBatchError as exc:
            raise ContinuousBatchingUnsupported(str(exc)) from exc
        if not takes_positions(self.model) and not positions_from_mask(self.model):
            raise ContinuousBatchingUnsupported(
                f"{type(self.model).__name__}.forward takes no position_ids, which rows padded to a common "
                "length need"
            )
        merged = merged_adapter_names(self.model)
        if merged:
            raise ContinuousBatchingUnsupported(
                f"adapters {merged} are merged into the base; unmerge them first"
            )
        return layers

    def _enter(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        last_logits: torch.Tensor,
        prompt_tokens: list[int],
        adapters: Sequence[str | None],
        max_new_tokens: Sequence[int],
        sampling: Sequence[Sampling],
        layers: list,
        wrappers: list[nn.Module],
    ) -> list[Step]:
        """Rows whose prompts are in `cache` (padded on the left, `mask`) take their first token from
        `last_logits` (rows, vocab) and join the batch; a row whose scores are not finite never joins."""
        if not isinstance(cache, DynamicCache) or any(
            type(layer) is not DynamicLayer for layer in cache.layers
        ):
            unsupported = [type(layer).__name__ for layer in getattr(cache, "layers", [None])]
            raise ContinuousBatchingUnsupported(
                f"the model keeps a {type(cache).__name__} with {sorted(set(unsupported))} layers; continuous "
                "batching merges plain DynamicCache layers only"
            )
        count = len(prompt_tokens)
        joining = []
        for i in range(count):
            sampler = Sampler(sampling[i])
            row = _Row(self._handles, adapters[i], max_new_tokens[i], sampler, prompt_tokens[i])
            row.logprobs = [] if sampler.sampling.logprobs is not None else None
            joining.append(row)
            self._handles += 1
        samplers = [r.sampler for r in joining]
        tokens, broken = next_tokens(last_logits, samplers, [[]] * count)
        chances = scored(last_logits, samplers, tokens)
        keep = [i for i in range(count) if i not in broken]
        if len(keep) < count:
            cache, mask = _select_rows(cache, mask, keep)
        if keep:
            self._merge(cache, mask)
            self._wrappers = wrappers
            self.rows += [joining[i] for i in keep]
            if self._updates is not None:
                self._updates.append([adapters[i] for i in keep], layers)
        return self._advance(joining, tokens, broken, chances)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.mask = with_room(cache, self._kv_dtype), mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            dtype = mine.dtype
            mine.hold(
                torch.cat([pad_left(mine.keys, width, -2), pad_left(theirs.keys.to(dtype), width, -2)]),
                torch.cat([pad_left(mine.values, width, -2), pad_left(theirs.values.to(dtype), width, -2)]),
            )
        self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(mask, width, 1)])

    # ---- decoding ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Step]:
        """One forward for every live row: each gets its next token; rows that end leave the batch."""
        if not self.rows:
            return []
        last = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        adapters = self.adapters
        # rows that all use one adapter take the ordinary path, not per-row updates: their stacks are built
        # only once the batch first mixes adapters (a copy of every row's factors), then kept up to date
        if len(adapters) == 1:
            rows_use = activated(self._wrappers, next(iter(adapters)))
        else:
            if self._updates is None:
                names = [r.adapter for r in self.rows]
                layers = check_mixable(self.model, names)
                self._updates = RowUpdates(self.model, names, layers, self._workspace, self.capacity)
            rows_use = self._updates.installed(self._wrappers)
        with rows_use, self._attention():
            out = self.model(
                input_ids=last,
                attention_mask=self.mask,
                **position_argument(self.model, self.mask.sum(-1, keepdim=True) - 1),
                use_cache=True,
                **{cache_argument(self.model): self.cache},
            )
        self.cache = cache_of(out)
        rows = list(self.rows)
        samplers = [r.sampler for r in rows]
        tokens, broken = next_tokens(out.logits[:, -1], samplers, [r.tokens for r in rows])
        return self._advance(rows, tokens, broken, scored(out.logits[:, -1], samplers, tokens))

    def _attention(self) -> AbstractContextManager:
        return attending_in_float32(self.model) if self._kv_dtype is not None else nullcontext()

    def _advance(
        self, rows: list[_Row], tokens: list[int], broken: dict[int, str], chances: list[TokenLogprob | None]
    ) -> list[Step]:
        """Hand each row its token (and its log-probability, to rows that asked); rows in `broken` (index ->
        why) end with an error instead."""
        steps, ended = [], []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if i in broken:
                error = NonFiniteOutput.of(broken[i], row.adapter)
                steps.append(Step(row.handle, None, "error", error))
                ended.append((row, "error"))
                continue
            if token in self.eos:
                row.stop_token = token
                steps.append(Step(row.handle, None, "stop"))
                ended.append((row, "stop"))
                continue
            row.tokens.append(token)
            if row.logprobs is not None:
                row.logprobs.append(chances[i])
            done = "length" if len(row.tokens) >= row.limit else None
            steps.append(Step(row.handle, token, done, logprob=chances[i]))
            if done:
                ended.append((row, done))
        self._drop(ended)
        return steps

    # ---- rows leaving -----------------------------------------------------------------------------------------
    def end(self, handle: int, reason: str = "cancelled") -> None:
        """End a live row now (its client went away, its stop string appeared); its tokens so far stand."""
        row = next((r for r in self.rows if r.handle == handle), None)
        if row is not None:
            self._drop([(row, reason)])

    def completion(self, handle: int) -> Completion:
        """An ended row's result (once; it is forgotten afterwards)."""
        return self.finished.pop(handle)

    def clear(self) -> list[int]:
        """Drop every live row (after a failed step); returns their handles."""
        handles = [r.handle for r in self.rows]
        self.rows, self.cache, self.mask, self._updates = [], None, None, None
        return handles

    def _drop(self, ended: list[tuple[_Row, str]]) -> None:
        """Rows leave: their results are kept; the last row moves into each gap (in the cache, the mask and
        the LoRA stacks alike, so only its own entries are copied), and leading all-padding columns are cut."""
        if not ended:
            return
        for row, reason in ended:
            self.finished[row.handle] = Completion(
                row.tokens, reason, row.prompt_tokens, row.logprobs, row.stop_token
            )
        gone = {row.handle for row, _ in ended}
        if not any(r.handle in gone for r in self.rows):
            return  # rows refused at `add` never joined
        for index in sorted((i for i, r in enumerate(self.rows) if r.handle in gone), reverse=True):
            last = len(self.rows) - 1
            if index != last:
                self.rows[index] = self.rows[last]
                self.mask[index] = self.mask[last]
                for layer in self.cache.layers:
                    layer.keys[index] = layer.keys[last]
                    layer.values[index] = layer.values[last]
            self.rows.pop()
            if self._updates is not None:
                self._updates.remove(index)
        count = len(self.rows)
        if not count:
            self.cache, self.mask = None, None
            return
        mask = self.mask[:count]
        start = int((mask.sum(0) > 0).nonzero()[0])  # columns before this are padding in every live row
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keep(count, start)


def _select_rows(
    cache: DynamicCache, mask: torch.Tensor, keep: list[int]
) -> tuple[DynamicCache, torch.Tensor]:
    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return cache, mask[index]
