"""Prompts into a KV cache for the decode batch, each row starting after the longest prefix a `PrefixCache`
holds for it.

Rows are left-padded to a common width, as before; a row that reuses a stored prefix of length L runs only its
remaining tokens, with the prefix's KV placed in the cache ahead of them:

    cache columns of a row:  [padding][its prefix: L_i, from the cache][padding][its new tokens]

The attention mask hides both paddings and each row's positions continue after its own prefix, so every row
sees exactly its own prompt. Rows with and without a stored prefix run as two forwards (one forward would pad
every row to the longest full prompt and save nothing), merged afterwards in the rows' order.

Before that, rows prefilled together that share a long prefix (G copies of one prompt, a batch under one
instruction) have it computed once and stored, so they all start after it: `generate` gets that sharing with a
cache of its own, a server keeps one cache across requests.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..core.adapters import activated, all_wrappers
from ..core.head_input import contiguous_head_input
from ..core.kv_cache import cache_argument, cache_of, full_dynamic_cache, position_argument
from .mixed import mixed_adapters
from .prefix_cache import PrefixCache, PrefixMatch, common_length
from .sampling import left_pad

# A prefix shared inside a batch is run on its own only when that saves at least this many prompt tokens:
# below it, the extra forward call (the weights read once more) costs more than the tokens it saves.
MIN_TOKENS_SAVED = 32


@dataclass
class Prefilled:
    """Prompts run through the model: their KV cache, the cache's attention mask (rows, columns) and the
    scores after each row's last token (rows, vocab)."""

    cache: DynamicCache
    mask: torch.Tensor
    last_logits: torch.Tensor


def prefill(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    owners: Sequence[str | None],
    *,
    pad_token_id: int,
    prefixes: PrefixCache | None = None,
) -> Prefilled:
    """Run `prompts`, row i under adapter `owners[i]` (a model-side name; None: the base), reusing `prefixes`
    and adding to it: the prefixes these rows share, and every prompt when the cache `keep_prompts`."""
    if prefixes is None:
        return _forward(model, prompts, owners, [None] * len(prompts), pad_token_id)
    for find in (_stems_all_share, _stems_some_share):
        stems = find(prompts, owners, prefixes)
        if stems:
            _run(model, [s for _, s in stems], [o for o, _ in stems], pad_token_id, prefixes, stems_only=True)
    return _run(model, prompts, owners, pad_token_id, prefixes, stems_only=False)


def _run(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    owners: Sequence[str | None],
    pad_token_id: int,
    prefixes: PrefixCache,
    *,
    stems_only: bool,
) -> Prefilled | None:
    """Rows with and without a stored prefix as two forwards, in the rows' order. `stems_only`: the rows are
    shared prefixes to store, not prompts: their last token needs no scores of its own, nothing is returned."""
    found = [prefixes.lookup(o, p, limit=None if stems_only else len(p) - 1) for p, o in zip(prompts, owners,
             strict=True)]  # fmt: skip
    remember = stems_only or prefixes.keep_prompts
    parts = []
    for rows in (
        [i for i in range(len(prompts)) if found[i] is None],
        [i for i in range(len(prompts)) if found[i]],
    ):
        if stems_only:
            rows = [i for i in rows if not found[i] or found[i].length < len(prompts[i])]
        if not rows:
            continue
        part = _forward(model, [prompts[i] for i in rows], [owners[i] for i in rows], [found[i] for i in rows],
                        pad_token_id)  # fmt: skip
        if remember:
            for j, i in enumerate(rows):
                _store_row(prefixes, part.cache, j, owners[i], prompts[i], found[i].length if found[i] else 0)
        parts.append((rows, part))
    return None if stems_only else _in_order(parts)


def _forward(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    owners: Sequence[str | None],
    found: Sequence[PrefixMatch | None],
    pad_token_id: int,
) -> Prefilled:
    """One forward of every row's tokens after its stored prefix (`found[i]`; None: the whole prompt)."""
    device = model_device(model)
    starts = [match.length if match else 0 for match in found]
    ids, mask = (t.to(device) for t in left_pad([p[s:] for p, s in zip(prompts, starts, strict=True)],
                                                pad_token_id))  # fmt: skip
    cache = full_dynamic_cache()
    width = max(starts)
    if width:
        prefix_mask = torch.zeros(len(prompts), width, dtype=mask.dtype, device=device)
        for i, start in enumerate(starts):
            prefix_mask[i, width - start :] = 1
        first = next(m for m in found if m)
        for layer in range(len(first.keys)):
            cache.update(
                _stacked(found, width, layer, "keys"), _stacked(found, width, layer, "values"), layer
            )
        mask = torch.cat([prefix_mask, mask], dim=1)
    new = mask[:, width:]
    positions = torch.tensor(starts, device=device).unsqueeze(1) + positions_of(new)
    accepts = inspect.signature(model.forward).parameters
    with adapters_of_rows(model, owners), contiguous_head_input(model):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            **position_argument(model, positions),
            use_cache=True,
            **{cache_argument(model): cache},
            # only the last position's scores are used: the output head over every prompt token was most of a
            # prefill's time on SmolLM2 (its 49k-word vocabulary)
            **({"logits_to_keep": 1} if "logits_to_keep" in accepts else {}),
        )
    return Prefilled(cache_of(out), mask, out.logits[:, -1])


def _stacked(found: Sequence[PrefixMatch | None], width: int, layer: int, kind: str) -> torch.Tensor:
    """The rows' stored prefix KV of one layer, each right-aligned in `width` columns (zeros before it)."""
    some = getattr(next(m for m in found if m), kind)[layer]
    heads, _, dim = some.shape
    stacked = some.new_zeros(len(found), heads, width, dim)
    for i, match in enumerate(found):
        if match:
            stacked[i, :, width - match.length :] = getattr(match, kind)[layer]
    return stacked


def _store_row(
    prefixes: PrefixCache, cache: DynamicCache, row: int, owner: str | None, prompt: Sequence[int], start: int
) -> None:
    """Store a prefilled row's KV: its last `len(prompt) - start` columns are `prompt[start:]`."""
    fresh = len(prompt) - start
    keys = [layer.keys[row, :, -fresh:] for layer in cache.layers]
    values = [layer.values[row, :, -fresh:] for layer in cache.layers]
    prefixes.insert(owner, prompt, keys, values, offset=start)


def _stems_all_share(
    prompts: Sequence[Sequence[int]], owners: Sequence[str | None], prefixes: PrefixCache
) -> list[tuple[str | None, tuple[int, ...]]]:
    """Per owner, the prefix all its rows share (an instruction every row repeats), where running it once
    saves enough; less each row's last token, which must run for its scores."""
    stems = []
    for owner, rows in _by_owner(prompts, owners).items():
        if len(rows) < 2:
            continue
        shared = min(common_length(rows[0], rows[-1]), min(len(r) for r in rows) - 1)  # rows are sorted
        stem = rows[0][:shared]
        if _pays(prefixes, owner, stem, len(rows)):
            stems.append((owner, stem))
    return stems


def _stems_some_share(
    prompts: Sequence[Sequence[int]], owners: Sequence[str | None], prefixes: PrefixCache
) -> list[tuple[str | None, tuple[int, ...]]]:
    """Per owner, the longest prefix each row shares with another (the G copies of one prompt, rows that
    open alike past the common instruction), where running it once saves enough; a stem that another
    chosen stem extends is left out (a match may end inside a stored prefix)."""
    stems = []
    for owner, rows in _by_owner(prompts, owners).items():
        chosen: set[tuple[int, ...]] = set()
        for k, row in enumerate(
            rows
        ):  # in sorted order the most a row shares with any other is with a neighbour
            shared = (
                max(common_length(row, rows[j]) for j in (k - 1, k + 1) if 0 <= j < len(rows))
                if len(rows) > 1
                else 0
            )
            stem = row[: min(shared, len(row) - 1)]
            sharers = sum(1 for other in rows if other[: len(stem)] == stem)
            if _pays(prefixes, owner, stem, sharers):
                chosen.add(stem)
        longest = sorted(chosen, key=len, reverse=True)
        stems += [(owner, s) for k, s in enumerate(longest) if not any(t[: len(s)] == s for t in longest[:k])]
    return stems


def _by_owner(
    prompts: Sequence[Sequence[int]], owners: Sequence[str | None]
) -> dict[str | None, list[tuple[int, ...]]]:
    """Each owner's prompts, sorted."""
    grouped: dict[str | None, list[tuple[int, ...]]] = {}
    for prompt, owner in zip(prompts, owners, strict=True):
        grouped.setdefault(owner, []).append(tuple(prompt))
    return {owner: sorted(rows) for owner, rows in grouped.items()}


def _pays(prefixes: PrefixCache, owner: str | None, stem: tuple[int, ...], sharers: int) -> bool:
    """Whether running `stem` once for `sharers` rows saves at least MIN_TOKENS_SAVED prompt tokens."""
    if len(stem) < prefixes.min_tokens:
        return False
    return (sharers - 1) * (len(stem) - prefixes.matched(owner, stem)) >= MIN_TOKENS_SAVED


def _in_order(parts: list[tuple[list[int], Prefilled]]) -> Prefilled:
    """The parts' rows as one batch in their original order, each part's columns padded on the left."""
    if len(parts) == 1:
        return parts[0][1]
    width = max(part.mask.shape[1] for _, part in parts)
    rows = [i for part_rows, _ in parts for i in part_rows]
    order = torch.tensor(sorted(range(len(rows)), key=rows.__getitem__), device=parts[0][1].mask.device)
    caches = [part.cache for _, part in parts]
    for i, layer in enumerate(caches[0].layers):
        layer.keys = torch.cat([pad_left(c.layers[i].keys, width, -2) for c in caches])[order]
        layer.values = torch.cat([pad_left(c.layers[i].values, width, -2) for c in caches])[order]
    mask = torch.cat([pad_left(part.mask, width, 1) for _, part in parts])[order]
    logits = torch.cat([part.last_logits for _, part in parts])[order]
    return Prefilled(caches[0], mask, logits)


def adapters_of_rows(model: nn.Module, owners: Sequence[str | None]) -> AbstractContextManager:
    """A block in which row i of a forward uses adapter `owners[i]`: the one adapter switched on when all rows
    share it (the ordinary path), else a mixed batch."""
    distinct = set(owners)
    if len(distinct) == 1:
        return activated([w for _, w in all_wrappers(model)], next(iter(distinct)))
    return mixed_adapters(model, list(owners), keep_workspace=False)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (left padding gets position 0, masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros added before its entries along `dim` up to `width`."""
    missing = width - t.shape[dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
