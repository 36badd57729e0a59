"""Prefix caching: the radix tree's bookkeeping (matches that end inside a node, owners kept apart, LRU leaves
evicted within a byte budget) and rows prefilled after a stored prefix answering as if run whole: the same
tokens, the same log-probabilities up to float rounding, under mixed adapters."""

from __future__ import annotations

import pytest
import torch
from test_runtime import ADAPTERS, _with_adapters, save_adapters

from deltatune.runtime import generate
from deltatune.runtime.decode import DecodeBatch
from deltatune.runtime.prefix_cache import PrefixCache
from deltatune.runtime.sampling import Sampling

LAYERS, HEADS, DIM = 2, 2, 3


def _kv(tokens, start=0):
    """Fake per-layer KV whose every entry is the token at that position (plus the layer), so a lookup's
    result shows which tokens it came from."""
    ids = torch.tensor(tokens[start:], dtype=torch.float32)
    keys = [(ids + layer).view(1, -1, 1).expand(HEADS, -1, DIM).clone() for layer in range(LAYERS)]
    return keys, [-k for k in keys]


def _tokens_of(match):
    return match.keys[0][0, :, 0].long().tolist()


def test_a_match_may_end_inside_a_stored_prompt_and_returns_its_kv():
    cache = PrefixCache(min_tokens=2)
    stored = list(range(10, 30))
    assert cache.insert("a", stored, *_kv(stored))
    match = cache.lookup("a", stored[:12] + [99, 98])
    assert match.length == 12 and _tokens_of(match) == stored[:12]
    assert torch.equal(match.values[1], -match.keys[1])
    assert cache.lookup("b", stored) is None  # another adapter's KV is never used
    assert cache.lookup("a", [10, 99]) is None  # shorter than min_tokens
    assert cache.lookup("a", stored, limit=15).length == 15


def test_prompts_that_part_ways_share_their_stem_once():
    cache = PrefixCache(min_tokens=2)
    stem = list(range(10, 20))
    first, second = stem + [1, 2, 3], stem + [4, 5]
    cache.insert("a", first, *_kv(first))
    bytes_one = cache.bytes_used
    # the second prompt's stem is stored already: only its own tokens are given and kept
    assert cache.insert("a", second, *_kv(second, start=10), offset=10)
    assert len(cache) == 3  # the stem split off, and two branches
    per_token = bytes_one // len(first)
    assert cache.bytes_used == bytes_one + 2 * per_token
    assert _tokens_of(cache.lookup("a", second + [7])) == second
    assert _tokens_of(cache.lookup("a", first)) == first


def test_least_recently_used_leaves_go_first_and_the_shared_stem_last():
    stem = list(range(10, 20))
    branches = [stem + [100 + i] * 5 for i in range(3)]
    per_token = sum(t.numel() * 4 for t in (*_kv([1])[0], *_kv([1])[1]))
    cache = PrefixCache(budget_bytes=per_token * (10 + 5 + 5), min_tokens=2)
    for branch in branches[:2]:
        cache.insert("a", branch, *_kv(branch))
    cache.lookup("a", branches[0])  # the first branch is now the more recently used
    cache.insert("a", branches[2], *_kv(branches[2]))
    assert cache.bytes_used <= cache.budget_bytes
    assert cache.matched("a", branches[1]) == 10  # evicted down to the stem
    assert cache.matched("a", branches[0]) == 15 and cache.matched("a", branches[2]) == 15
    assert cache.stats.evicted_bytes == 5 * per_token


def test_kv_is_not_placed_after_a_stem_that_was_evicted():
    cache = PrefixCache(min_tokens=2)
    prompt = list(range(10, 22))
    assert not cache.insert("a", prompt, *_kv(prompt, start=6), offset=6)
    assert cache.bytes_used == 0


def test_forget_drops_an_owners_prompts():
    cache = PrefixCache(min_tokens=2)
    prompt = list(range(10, 22))
    cache.insert("a", prompt, *_kv(prompt))
    cache.insert(None, prompt, *_kv(prompt))
    cache.forget("a")
    assert cache.matched("a", prompt) == 0 and cache.matched(None, prompt) == len(prompt)
    assert cache.bytes_used == sum(t.numel() * 4 for t in (*_kv(prompt)[0], *_kv(prompt)[1]))


def _prompt_sets():
    g = torch.Generator().manual_seed(7)

    def tokens(n):
        return torch.randint(1, 96, (n,), generator=g).tolist()

    instruction = tokens(20)
    shared = [instruction + tokens(n) for n in (3, 6, 1, 9, 4, 2)]  # one instruction under every row
    group = tokens(12)
    copies = [group] * 4 + [tokens(13)] * 2  # GRPO's copies of one prompt
    return {"instruction": shared, "copies": copies}


def _streamed(model, prompts, adapters, prefixes, limit=6):
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, prefixes=prefixes)
    sampling = [Sampling(logprobs=3)] * len(prompts)
    steps = batch.add(prompts, adapters, max_new_tokens=[limit] * len(prompts), sampling=sampling)
    handles = [s.row for s in steps]
    while len(batch):
        batch.step()
    return [batch.completion(h) for h in handles]


def _assert_same_answers(reused, whole):
    for got, want in zip(reused, whole, strict=True):
        assert got.tokens == want.tokens
        for a, b in zip(got.logprobs, want.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("kind", ["instruction", "copies"])
def test_rows_sharing_a_prefix_answer_as_if_run_whole(kind, device):
    """The shared prefix runs once per owner and is stored; mixed adapters (and the base) keep theirs apart."""
    model = _with_adapters().to(device)
    prompts = _prompt_sets()[kind]
    adapters = ["a", "b", None, "a", "b", "a"] if kind == "instruction" else ["a"] * 4 + ["b"] * 2
    prefixes = PrefixCache(min_tokens=4, keep_prompts=False)
    with torch.no_grad():
        reused = _streamed(model, prompts, adapters, prefixes)
        whole = _streamed(model, prompts, adapters, None)
    _assert_same_answers(reused, whole)
    assert prefixes.stats.tokens_reused >= len(prompts[0]) and prefixes.bytes_used > 0
    assert set(prefixes._roots) <= set(adapters)


def test_a_later_request_reuses_what_an_earlier_one_stored(device):
    """A server's cache keeps every prompt: a request that opens like an earlier one runs only the rest,
    alone or joining a batch already decoding, and answers as the uncached batch does."""
    model = _with_adapters().to(device)
    prompts = _prompt_sets()["instruction"]
    prefixes = PrefixCache(min_tokens=4, keep_prompts=True)
    with torch.no_grad():
        _streamed(model, prompts[:1], ["b"], prefixes)
        assert prefixes.matched("b", prompts[0]) == len(prompts[0])
        later = _streamed(model, prompts[1:3], ["b", "b"], prefixes)
        whole = _streamed(model, prompts[1:3], ["b", "b"], None)
    _assert_same_answers(later, whole)
    assert prefixes.stats.hits >= 2 and prefixes.stats.tokens_reused >= 2 * 20


def test_generate_shares_prefixes_and_keeps_its_tokens(device):
    model = _with_adapters().to(device)
    prompts = _prompt_sets()["instruction"] * 2
    adapters = list(ADAPTERS) * 4
    kwargs = dict(
        max_new_tokens=5, pad_token_id=0, eos_token_id=None, sampling=Sampling(temperature=0.8, seed=3)
    )
    shared = generate(model, prompts, adapters, **kwargs)
    plain = generate(model, prompts, adapters, share_prefixes=False, **kwargs)
    assert [c.tokens for c in shared] == [c.tokens for c in plain]


def test_a_server_reuses_a_shared_system_prompt_in_short_and_chunked_prompts_and_forgets_on_unload(tmp_path):
    """Requests that open with one system prompt run it once per adapter: a short one joining the batch and
    a long one prefilled in chunks (`PromptPass`) both start after it, and answer as a server without the
    cache does. Unloading the adapter drops its stored KV."""
    from types import SimpleNamespace

    from conftest import build_llama

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine, Row

    g = torch.Generator().manual_seed(11)
    system = torch.randint(1, 96, (20,), generator=g).tolist()
    asks = [system + torch.randint(1, 96, (n,), generator=g).tolist() for n in (5, 3, 60, 7)]  # 80: chunked
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    adapters_dir = save_adapters(tmp_path)

    def answers(prefix_cache_bytes):
        model = build_llama()
        cache = AdapterCache(model, adapters_dir)
        engine = Engine(model, tokenizer, cache, prompt_tokens_per_round=64,
                        prefix_cache_bytes=prefix_cache_bytes)  # fmt: skip
        try:  # one after another, so each finds what the ones before stored
            done = [
                engine.submit(Row(ids, "r4", 5, Sampling(logprobs=2))).result(timeout=600) for ids in asks
            ]
            stored = engine.prefixes and engine.prefixes.matched(cache.key_of("r4"), asks[0])
            engine.call(lambda: cache.unload("r4")).result(timeout=600)
        finally:
            engine.close()
        return done, engine, stored

    reused, engine, stored = answers(1 << 20)
    whole, plain, _ = answers(0)
    _assert_same_answers(reused, whole)
    assert stored == len(asks[0])
    # the long prompt ran as a pass: 80 tokens in two chunks of at most 64, 60 after the stored prefix in one
    assert (plain.stats.prompt_chunks, engine.stats.prompt_chunks) == (2, 1)
    assert engine.prefixes.stats.hits == 3 and engine.prefixes.stats.tokens_reused >= 3 * 20
    assert engine.prefixes.bytes_used == 0  # forgotten with the adapter


def test_a_cache_with_a_negative_budget_or_no_minimum_is_refused():
    for bad in (dict(budget_bytes=-1), dict(min_tokens=0)):
        with pytest.raises(ValueError, match="budget_bytes >= 0 and min_tokens >= 1"):
            PrefixCache(**bad)
