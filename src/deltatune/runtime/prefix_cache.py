"""The KV of prompt prefixes computed before, kept to be reused: a prompt that opens like an earlier one (the
chat template and system prompt most requests share, the instruction every evaluation row repeats, the G
copies of one prompt GRPO samples) runs only its new tokens.

The keys and values of a causal model at position i depend only on the tokens up to i (and on the weights),
so the KV of any stored prompt, cut at the point where a new prompt departs from it, is that new prompt's KV
there. The stored prompts form a radix tree per owner (the adapter the KV was computed under, or None for the
base: an adapter changes every layer's keys): each node holds the tokens it adds after its parent and their
KV, so a prefix shared by many prompts is stored once, and a match may end inside a node. Memory is bounded in
bytes; beyond the bound the least recently used leaves go first, so a shared stem outlives its branches.

The cache is only valid while the weights it was computed under stay as they are: whoever changes an owner's
weights (unloads an adapter, copies another into its tensors, trains it) calls `forget(owner)`. Reused KV
equals a fresh prefill up to float summation order (the matrix shapes differ), not bit for bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_BUDGET_BYTES = 256 * 2**20
MIN_TOKENS = 8  # a shorter match is not used: rows with different matches run in separate forwards


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]  # the tokens this node adds after its parent's
    keys: list[torch.Tensor]  # per layer: (kv_heads, len(tokens), head_dim)
    values: list[torch.Tensor]
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)  # by their first token
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def split(self, at: int) -> None:
        """Keep the first `at` tokens here and move the rest into a new child (which takes the children)."""
        rest = _Node(
            self.tokens[at:],
            [k[:, at:].clone() for k in self.keys],
            [v[:, at:].clone() for v in self.values],
            self,
            self.children,
            self.last_used,
        )
        for child in rest.children.values():
            child.parent = rest
        self.tokens = self.tokens[:at]
        self.keys = [k[:, :at].clone() for k in self.keys]
        self.values = [v[:, :at].clone() for v in self.values]
        self.children = {rest.tokens[0]: rest}


@dataclass
class PrefixMatch:
    """The longest stored prefix of a prompt: its length and its KV per layer, (kv_heads, length, head_dim)."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0  # lookups that found at least `min_tokens`
    tokens_reused: int = 0  # prompt tokens whose KV came from the cache instead of a forward
    evicted_bytes: int = 0


class PrefixCache:
    """Stored prompt prefixes of one model, per owner, within `budget_bytes`.

    `keep_prompts`: store every prompt prefilled (a server: later requests find what earlier ones shared);
    False stores only the prefixes that rows prefilled together share (one `generate` call). Not thread-safe:
    the thread that runs the model uses it."""

    def __init__(
        self,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        *,
        min_tokens: int = MIN_TOKENS,
        keep_prompts: bool = True,
    ) -> None:
        if budget_bytes < 0 or min_tokens < 1:
            raise ValueError(
                f"a prefix cache needs budget_bytes >= 0 and min_tokens >= 1, got {budget_bytes}, {min_tokens}"
            )
        self.budget_bytes, self.min_tokens, self.keep_prompts = budget_bytes, min_tokens, keep_prompts
        self.stats = PrefixStats()
        self._roots: dict[Hashable, _Node] = {}
        self._clock = itertools.count(1)
        self._bytes = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        """Stored nodes (shared stems count once)."""
        return sum(1 for root in self._roots.values() for _ in _below(root))

    # ---- reading ------------------------------------------------------------------------------------------
    def matched(self, owner: Hashable, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the cache holds KV for under `owner` (any length; nothing touched)."""
        return sum(used for _, used in self._walk(owner, tokens))

    def lookup(self, owner: Hashable, tokens: Sequence[int], limit: int | None = None) -> PrefixMatch | None:
        """The KV of the longest stored prefix of `tokens[:limit]`, copied out of the cache; None when shorter
        than `min_tokens`. Marks what it used as recently used."""
        self.stats.lookups += 1
        path = self._walk(owner, tokens[:limit] if limit is not None else tokens)
        length = sum(used for _, used in path)
        if length < self.min_tokens:
            return None
        now = next(self._clock)
        for node, _ in path:
            node.last_used = now
        layers = range(len(path[0][0].keys))
        keys = [torch.cat([n.keys[i][:, :used] for n, used in path], dim=1) for i in layers]
        values = [torch.cat([n.values[i][:, :used] for n, used in path], dim=1) for i in layers]
        self.stats.hits += 1
        self.stats.tokens_reused += length
        return PrefixMatch(length, keys, values)

    def _walk(self, owner: Hashable, tokens: Sequence[int]) -> list[tuple[_Node, int]]:
        """The nodes a prefix of `tokens` runs through, each with how many of its tokens match."""
        path: list[tuple[_Node, int]] = []
        node, done = self._roots.get(owner), 0
        while node is not None and done < len(tokens):
            child = node.children.get(tokens[done])
            if child is None:
                break
            used = common_length(child.tokens, tokens, done)
            path.append((child, used))
            done += used
            if used < len(child.tokens):
                break
            node = child
        return path

    # ---- writing ------------------------------------------------------------------------------------------
    def insert(
        self,
        owner: Hashable,
        tokens: Sequence[int],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        offset: int = 0,
    ) -> bool:
        """Store the KV of `tokens`; `keys`/`values` (per layer, (kv_heads, len(tokens) - offset, head_dim))
        cover `tokens[offset:]`, the cache holding the rest already. Copies what it keeps. False when the
        first `offset` tokens are no longer stored (evicted meanwhile), so the KV cannot be placed."""
        tokens = tuple(tokens)
        if len(tokens) < self.min_tokens:
            return False  # too short to be used
        root = self._roots.setdefault(owner, _Node((), [], [], None))
        node, done = root, 0
        now = next(self._clock)
        while done < len(tokens):
            child = node.children.get(tokens[done])
            if child is None:
                break
            used = common_length(child.tokens, tokens, done)
            if used < len(child.tokens):
                child.split(used)
            child.last_used = now
            node, done = child, done + used
        if done < offset:
            return False
        if done < len(tokens):
            start = done - offset
            leaf = _Node(
                tokens[done:],
                [k[:, start:].clone() for k in keys],
                [v[:, start:].clone() for v in values],
                node,
                last_used=now,
            )
            node.children[tokens[done]] = leaf
            self._bytes += leaf.nbytes
        self._evict(keep=now)
        return self.matched(owner, tokens) == len(tokens)

    def forget(self, owner: Hashable) -> None:
        """Drop everything stored under `owner` (its weights changed or went away)."""
        root = self._roots.pop(owner, None)
        if root is not None:
            self._bytes -= sum(n.nbytes for n in _below(root))

    def clear(self) -> None:
        self._roots.clear()
        self._bytes = 0

    def _evict(self, keep: int) -> None:
        """Drop least recently used leaves until the cache fits its budget; leaves touched at `keep` (the
        insert being made) go last."""
        while self._bytes > self.budget_bytes:
            leaves = [n for root in self._roots.values() for n in _below(root) if not n.children]
            if not leaves:
                return
            victim = min(leaves, key=lambda n: (n.last_used == keep, n.last_used))
            del victim.parent.children[victim.tokens[0]]
            self._bytes -= victim.nbytes
            self.stats.evicted_bytes += victim.nbytes
        for owner in [o for o, root in self._roots.items() if not root.children]:
            del self._roots[owner]


def common_length(stored: Sequence[int], tokens: Sequence[int], start: int = 0) -> int:
    """How many leading entries of `stored` equal those of `tokens[start:]`."""
    count = min(len(stored), len(tokens) - start)
    for i in range(count):
        if stored[i] != tokens[start + i]:
            return i
    return count


def _below(root: _Node):
    """Every node under `root` (not `root` itself)."""
    stack = list(root.children.values())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())
