"""The serving engine under faults: no row may stop it. A row whose sampling or scores are bad fails alone while
the rows batched with it get their normal answers; an unexpected error fails only the rows in flight; rows
have deadlines; if the thread ends anyway, that is visible and nothing waits forever."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from serve_helpers import saved_lora_adapters

import deltatune as dt

pytest.importorskip("fastapi")

PROMPT = "good day"


@pytest.fixture(scope="module")
def adapters_dir(tiny_causal_lm, tmp_path_factory) -> Path:
    both = {name: (2, ["q_proj", "v_proj"]) for name in ("alpha", "beta")}
    root = saved_lora_adapters(tiny_causal_lm, tmp_path_factory.mktemp("engine-faults"), both, b_std=0.5)
    shutil.copytree(root / "alpha", root / "poisoned")
    return root


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture
def engine(tiny_causal_lm, adapters_dir):
    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    engine = Engine(model, tokenizer, AdapterCache(model, adapters_dir), batch_window_s=0.3)
    engine.ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    yield engine
    engine.close(timeout_s=10)


def _row(engine, adapter="alpha", n=6, *, deadline=None, on_token=None, **sampling):
    from deltatune.runtime.sampling import Sampling
    from deltatune.serve.engine import Row

    return Row(list(engine.ids), adapter, n, Sampling(**sampling), deadline=deadline, on_token=on_token)


def _answers(engine, rows):
    futures = [engine.submit(r) for r in rows]
    out = []
    for f in futures:
        try:
            out.append(f.result(timeout=600))
        except Exception as exc:
            out.append(exc)
    return out


@pytest.mark.slow
def test_a_tiny_temperature_is_greedy_and_the_engine_keeps_serving(engine):
    (greedy,) = _answers(engine, [_row(engine)])
    tiny, normal = _answers(engine, [_row(engine, temperature=1e-50), _row(engine, "beta")])
    assert tiny.tokens == greedy.tokens and len(normal.tokens) == 6
    sampled = _answers(engine, [_row(engine, temperature=1e-4) for _ in range(3)])
    assert all(len(s.tokens) == 6 for s in sampled)  # finite scores at tiny temperatures: no NaN
    assert engine.alive and engine.stats.failed_rows == 0


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(math.nan, 1.0), (math.inf, 1.0), (-0.5, 1.0), (1.0, 0.0), (1.0, math.nan)]
)
def test_sampling_settings_no_row_can_use_are_refused_before_the_engine(engine, temperature, top_p):
    with pytest.raises(ValueError, match="temperature|top_p"):
        _row(engine, temperature=temperature, top_p=top_p)


@pytest.mark.slow
def test_a_row_with_non_finite_scores_fails_alone(engine):
    """An adapter whose weights turned NaN after loading (the load check refuses such files): its row fails
    with a message naming the adapter; the rows decoding beside it are not disturbed."""
    from deltatune.runtime.decode import NonFiniteOutput

    (reference,) = _answers(engine, [_row(engine, "beta", n=8)])
    key = engine.cache.load("poisoned").key
    for _, layer in dt.core.adapters.adapter_layers(engine.model):
        if key in layer.adapter_configs:
            layer.lora_B[key].weight.data.fill_(math.nan)
    rows = [_row(engine, "beta", n=8), _row(engine, "poisoned", temperature=0.7), _row(engine, "poisoned")]
    good, sampled, greedy = _answers(engine, rows)
    assert good.tokens == reference.tokens
    for failed in (sampled, greedy):
        assert isinstance(failed, NonFiniteOutput) and "NaN" in str(failed) and "poisoned" in str(failed)
    assert engine.stats.failed_rows == 2 and engine.alive
    assert _answers(engine, [_row(engine, "beta", n=8)])[0].tokens == reference.tokens


@pytest.mark.slow
def test_a_row_turning_non_finite_mid_decode_leaves_the_running_batch(engine, monkeypatch):
    from deltatune.runtime import decode

    real = decode.next_tokens
    calls = []

    def poison_second_row_at_step_three(logits, samplers, generated):
        calls.append(len(samplers))
        if len(calls) == 4 and logits.shape[0] == 2:
            logits = logits.clone()
            logits[1, 5] = math.inf
        return real(logits, samplers, generated)

    (reference,) = _answers(engine, [_row(engine, "beta", n=8)])
    monkeypatch.setattr(decode, "next_tokens", poison_second_row_at_step_three)
    good, bad = _answers(engine, [_row(engine, "beta", n=8), _row(engine, "alpha", n=8)])
    assert good.tokens == reference.tokens
    assert isinstance(bad, decode.NonFiniteOutput) and "infinite" in str(bad)
    assert len(engine.decoding) == 0 and not engine.decoding.finished


@pytest.mark.slow
def test_an_unexpected_error_fails_the_rows_in_flight_and_the_loop_carries_on(engine, monkeypatch):
    from deltatune.serve.engine import Engine

    real, failures = Engine._deliver, [KeyError("a bug")]

    def deliver_once_broken(self, steps):
        if failures:
            raise failures.pop()
        real(self, steps)

    monkeypatch.setattr(Engine, "_deliver", deliver_once_broken)
    broken = _answers(engine, [_row(engine), _row(engine, "beta")])
    assert all(isinstance(b, KeyError) for b in broken)
    assert engine.stats.recovered_errors == 1 and engine.alive
    assert len(_answers(engine, [_row(engine)])[0].tokens) == 6
    assert len(engine.decoding) == 0 and not engine._live


@pytest.mark.slow
def test_rows_past_their_deadline_fail_and_free_the_batch(engine):
    from deltatune.serve.engine import RequestTimeout

    late, slow = _answers(
        engine,
        [_row(engine, deadline=time.monotonic() - 1), _row(engine, n=10**6, deadline=time.monotonic() + 1)],
    )
    assert isinstance(late, RequestTimeout) and isinstance(slow, RequestTimeout)
    assert engine.stats.timed_out_rows == 2 and len(engine.decoding) == 0
    assert len(_answers(engine, [_row(engine)])[0].tokens) == 6


class _Fatal(BaseException):
    """What no handler catches (like a MemoryError escalated by a C extension, or a thread-killing bug)."""


@pytest.mark.slow
def test_if_the_thread_dies_it_is_visible_and_nothing_hangs(engine, monkeypatch):
    from deltatune.serve.engine import Engine, EngineStopped

    def die(self, *_):
        raise _Fatal("boom")

    (first,) = _answers(engine, [_row(engine)])
    monkeypatch.setattr(Engine, "_admit", die)
    (failed,) = _answers(engine, [_row(engine)])
    engine._thread.join(timeout=600)
    assert isinstance(failed, EngineStopped) and "internal error (_Fatal)" in str(failed)
    assert not engine.alive and isinstance(engine.failure, _Fatal)
    with pytest.raises(EngineStopped, match="restart the server"):
        engine.submit(_row(engine))
    with pytest.raises(EngineStopped):
        engine.call(lambda: None)
    engine.close(timeout_s=5)
    assert not engine._thread.is_alive()


@pytest.mark.slow
def test_close_fails_queued_and_running_rows_and_returns(engine):
    from deltatune.serve.engine import EngineStopped

    futures = [engine.submit(_row(engine, n=10**6)) for _ in range(3)]
    time.sleep(1)
    engine.close(timeout_s=10)
    for f in futures:
        with pytest.raises(EngineStopped):
            f.result(timeout=1)
    assert not engine.alive


@pytest.mark.slow
def test_adapter_calls_run_ahead_of_queued_rows(engine):
    """Loading or unloading an adapter does not wait for the rows queued before it."""
    order = []
    rows = [_row(engine, "beta", n=40) for _ in range(40)]
    for r in rows:
        r.future.add_done_callback(lambda _: order.append("row"))
        engine.submit(r)
    engine.call(lambda: order.append("call")).result(timeout=600)
    for r in rows:
        r.future.result(timeout=120)
    assert order.index("call") < 20


@pytest.mark.slow
def test_a_busy_adapter_drains_then_unloads_and_later_rows_load_it_again(engine, monkeypatch):
    import threading

    from deltatune.runtime.decode import DecodeBatch

    (alone,) = _answers(engine, [_row(engine, n=3)])
    real_step = DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(0.02), real_step(self))[1])
    started = threading.Event()
    running = _row(engine, n=30, on_token=lambda *_: started.set())
    running_future = engine.submit(running)
    assert started.wait(timeout=600)
    drained = engine.call(lambda: engine.cache.unload_when_idle("alpha")).result(timeout=600)
    assert not drained.done()  # the running row still uses it
    later = engine.submit(_row(engine, n=3))  # arrives while it drains: waits, not refused
    assert len(running_future.result(timeout=600).tokens) == 30
    drained.result(timeout=600)
    assert later.result(timeout=600).tokens == alone.tokens
    assert "alpha" in engine.cache  # loaded again for the later row
    assert engine.stats.failed_rows == 0


def test_an_unexpected_error_logs_its_traceback_once(caplog):
    """A broken adapter fails every request that uses it: its traceback once, then a line each time."""
    from deltatune.serve.errors import status_of

    with caplog.at_level(logging.ERROR, logger="deltatune.serve"):
        for _ in range(3):
            assert status_of(RuntimeError("value cannot be converted to type float")).status == 500
        assert status_of(KeyError("another")).status == 500
    records = [r for r in caplog.records if "request failed" in r.getMessage()]
    assert [r.exc_info is not None for r in records] == [True, False, False, True]
    assert "traceback logged before" in records[1].getMessage()
