"""A bounded soak of the real server (bench/soak.py's driver, smaller): 16 clients, mixed adapters, streamed
and plain requests, clients giving up mid-answer, adapters loaded and unloaded during the traffic. No 5xx,
every greedy answer equal to the same request made alone, and no memory growth from one round to the next."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import soak  # noqa: E402
from serve_helpers import AUTH, running_server  # noqa: E402

MAX_TOKENS = 8


@pytest.mark.slow
def test_soak(tiny_causal_lm, tmp_path):
    base, adapters = soak.make_base_and_adapters(tmp_path, str(tiny_causal_lm))
    with running_server(base, tmp_path / "adapters", "--max-tokens", str(MAX_TOKENS)) as (process, url):
        models = ["base", *adapters]
        expected = soak.references(url, AUTH, models, MAX_TOKENS)
        assert len(set(expected.values())) > len(soak.PROMPTS)  # the adapters answer differently
        rounds = [
            soak.run_round(
                url,
                AUTH,
                process.pid,
                models,
                adapters,
                expected,
                clients=16,
                requests=200,
                max_tokens=MAX_TOKENS,
            )
            for _ in range(2)
        ]
    for outcome in rounds:
        summary = outcome.summary()
        assert outcome.server_errors == 0 and set(outcome.statuses) == {200}, summary
        assert not outcome.mismatches, summary
        assert outcome.requests + outcome.abandoned == 200 and outcome.abandoned == 20, summary
        assert sum(outcome.adapter_calls.values()) == 8, summary
        assert set(outcome.adapter_calls) <= {"load 200", "unload 200", "unload 404"}, summary
    # the first round warms everything up (adapters, free slots, the decode stacks); the second adds nothing
    growth = rounds[1].rss_after_mib - rounds[0].rss_after_mib
    assert growth < 16, [r.summary() for r in rounds]
