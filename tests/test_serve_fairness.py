"""No request starves another: prompts scored for echo wait in the same bounded queue as rows, under the same
deadline and cancellation; long prompts run in chunks between decode steps, so rows already answering keep
getting tokens and a short request overtakes a long one. Every verdict here follows from the order of
events on the engine thread (a gate it waits on, the chunks and tokens it records), never from durations."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch
from serve_helpers import saved_lora_adapters
from test_serve_engine_faults import _model

pytest.importorskip("fastapi")

GUARD_S = 120  # a hang guard only: every wait below ends on an event


@pytest.fixture(scope="module")
def adapters_dir(tiny_causal_lm, tmp_path_factory):
    alpha = {"alpha": (2, ["q_proj", "v_proj"])}
    return saved_lora_adapters(tiny_causal_lm, tmp_path_factory.mktemp("fairness"), alpha, b_std=0.5)


def _engine(tiny_causal_lm, adapters_dir, **options):
    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine

    model = _model(tiny_causal_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    return Engine(model, tokenizer, AdapterCache(model, adapters_dir), batch_window_s=0, **options)


class _Events(list):
    on_chunk = staticmethod(lambda length: None)  # called on the engine thread after each chunk


@pytest.fixture
def events(monkeypatch):
    """What the engine thread did, in order: ("chunk", prompt length, tokens run) per prompt pass advance."""
    from deltatune.runtime.prompt_pass import PromptPass

    log = _Events()
    real = PromptPass.advance

    def advance(self, budget):
        ran = real(self, budget)
        log.append(("chunk", len(self.prompt), ran))
        log.on_chunk(len(self.prompt))
        return ran

    monkeypatch.setattr(PromptPass, "advance", advance)
    return log


def _prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 90, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hold(engine) -> threading.Event:
    """Keep the engine thread busy (in a Call) until the returned gate is set: work submitted meanwhile is
    all queued when it resumes."""
    gate, holding = threading.Event(), threading.Event()
    engine.call(lambda: (holding.set(), gate.wait(GUARD_S)))
    assert holding.wait(GUARD_S)
    return gate


def _done_order(futures: dict[str, Future]) -> list[str]:
    order: list[str] = []
    lock = threading.Lock()
    for name, future in futures.items():
        future.add_done_callback(lambda _, name=name: (lock.acquire(), order.append(name), lock.release()))
    for future in futures.values():
        future.exception(timeout=GUARD_S)
    return order


def test_scoring_waits_in_the_bounded_queue_and_is_refused_when_it_is_full(tiny_causal_lm, adapters_dir):
    from deltatune.serve.work import Row, Score, ServerBusy

    engine = _engine(tiny_causal_lm, adapters_dir, max_queue=2, max_batch=1)
    try:
        gate = _hold(engine)
        queued = [engine.submit(Score(_prompt(5), None)), engine.submit(Row(_prompt(4), None, 2))]
        with pytest.raises(ServerBusy):
            engine.submit(Score(_prompt(5), "alpha"))
        gate.set()
        scores = queued[0].result(GUARD_S)
        assert [s.token for s in scores] == _prompt(5)[1:]
        assert len(queued[1].result(GUARD_S).tokens) == 2
    finally:
        engine.close()


def test_scoring_is_cancelled_and_timed_out_like_rows(tiny_causal_lm, adapters_dir, events):
    from deltatune.serve.work import RequestCancelled, RequestTimeout, Score

    engine = _engine(tiny_causal_lm, adapters_dir, prompt_tokens_per_round=8)
    try:
        gate = _hold(engine)
        overdue = Score(_prompt(6), None, deadline=0.0)  # time.monotonic() is past 0 on any machine
        left = Score(_prompt(6), "alpha")
        left.cancelled = True  # its client went away before it started
        leaving = Score(_prompt(80, seed=1), "alpha")
        # its client goes away after the first chunk (set on the engine thread, between two chunks)
        events.on_chunk = lambda length: length == 80 and setattr(leaving, "cancelled", True)
        futures = [engine.submit(s) for s in (overdue, left, leaving)]
        gate.set()
        with pytest.raises(RequestTimeout):
            futures[0].result(GUARD_S)
        with pytest.raises(RequestCancelled):
            futures[1].result(GUARD_S)
        with pytest.raises(RequestCancelled):
            futures[2].result(GUARD_S)
        assert [e for e in events if e[1] == 80] == [("chunk", 80, 8)]  # dropped before its second chunk
        assert engine.stats.scored_prompts == 0
    finally:
        engine.close()


def test_long_prompts_run_in_chunks_between_decode_steps_and_a_short_request_overtakes_them(
    tiny_causal_lm, adapters_dir, events
):
    """Two 60-token prompts arrive with a short one behind them while a row is decoding: the decoding row gets
    a token between every two chunks, the short request is answered before either long one, and every
    answer equals the same row run unchunked."""
    from deltatune.serve.work import Row

    engine = _engine(tiny_causal_lm, adapters_dir, prompt_tokens_per_round=8)
    reference = _engine(tiny_causal_lm, adapters_dir, prompt_tokens_per_round=10_000)
    try:
        jobs = {
            "live": (_prompt(3, seed=5), "alpha", 40),
            "long1": (_prompt(60, seed=6), None, 2),
            "long2": (_prompt(60, seed=7), "alpha", 2),
            "short": (_prompt(4, seed=8), None, 2),
        }
        gate = _hold(engine)
        rows = {name: Row(list(p), a, n) for name, (p, a, n) in jobs.items()}
        rows["live"].on_token = lambda token, _: events.append(("token",))
        futures = {name: engine.submit(row) for name, row in rows.items()}
        gate.set()
        order = _done_order(futures)
        assert order.index("short") < order.index("long1") and order.index("short") < order.index("long2")
        long_chunks = [i for i, e in enumerate(events) if e[0] == "chunk" and e[1] == 60]
        assert len(long_chunks) >= 2 * 60 // 8
        tokens_between = [
            any(e == ("token",) for e in events[a:b])
            for a, b in zip(long_chunks, long_chunks[1:], strict=False)
        ]
        assert all(tokens_between[: len(long_chunks) // 2])  # the live row (40 tokens) decodes meanwhile
        for name, (prompt, adapter, n) in jobs.items():
            alone = reference.submit(Row(list(prompt), adapter, n)).result(GUARD_S)
            assert futures[name].result().tokens == alone.tokens, name
        assert engine.stats.prompt_chunks >= len(long_chunks)
    finally:
        engine.close()
        reference.close()


def test_one_request_of_many_long_prompts_does_not_hold_a_later_one(tiny_causal_lm, adapters_dir, events):
    """The issue's case, scaled down: a request of max_batch long prompts with one token each fills every
    slot; the next request's row gets a slot as soon as the first long row is done, not after all."""
    from deltatune.serve.work import Row

    engine = _engine(tiny_causal_lm, adapters_dir, prompt_tokens_per_round=8, max_batch=4)
    try:
        gate = _hold(engine)
        futures = {f"long{i}": engine.submit(Row(_prompt(48, seed=i), None, 1)) for i in range(4)}
        futures["next"] = engine.submit(Row(_prompt(4, seed=9), None, 1))
        gate.set()
        order = _done_order(futures)
        assert order.index("next") < 3, order  # before the last two long rows at least
    finally:
        engine.close()
