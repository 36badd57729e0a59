"""Property-based fuzzing of the server from its own OpenAPI schema (schemathesis, on hypothesis): whatever a
client sends to any endpoint, the answer is never a 5xx, and the next ordinary request still gets its right
answer. Runs against the real process, so connection handling is covered too."""

from __future__ import annotations

import httpx
import pytest
import torch
from serve_helpers import AUTH, running_server

import deltatune as dt

pytestmark = pytest.mark.slow  # a real server process and hypothesis' hundreds of requests

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402  (hypothesis comes with schemathesis)

EXAMPLES = 40  # per operation; about 30 s for the whole schema on 2 CPU cores


@pytest.fixture(scope="module")
def served(tiny_causal_lm, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fuzzed")
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.float32).eval()
    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]), "a")
    dt.save_adapter(model, root / "good", adapter_name="a")
    options = ["--max-tokens", "8", "--max-prompt-tokens", "64", "--batch-window-ms", "5"]
    with (
        running_server(tiny_causal_lm, root, *options) as (_, url),
        httpx.Client(base_url=url, headers=AUTH) as http,
    ):
        body = {"model": "good", "prompt": "good day", "max_tokens": 4, "temperature": 0}
        reference = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        yield url, http, body, reference


@pytest.fixture(scope="module")
def api_schema(served):
    url, http, _, _ = served
    raw = http.get("/v1/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/adapters"} <= set(raw["paths"])
    return schemathesis.openapi.from_dict(raw)


def test_no_request_gets_a_5xx_and_the_server_keeps_answering(served, api_schema):
    """Cases valid under the schema and cases that break it (schemathesis' negative mode), for every
    operation. The model field is often set to a served model, so bodies get past the 404."""
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    url, http, body, reference = served
    operations = [op.ok() for op in api_schema.get_all_operations()]
    strategies = [
        op.as_strategy(mode)
        for op in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES * len(operations),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same cases every run: a failure reproduces
        database=None,
    )
    @given(case=st.one_of(strategies), served_model=st.sampled_from([None, "good", "base"]))
    def one_case(case, served_model):
        if served_model and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = served_model
        response = case.call(base_url=url, headers=AUTH, timeout=600)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.body!r}: {response.text}"
        )
        follow_up = http.post("/v1/completions", json=body, timeout=600)
        assert follow_up.status_code == 200 and follow_up.json()["choices"][0]["text"] == reference

    one_case()
    assert seen.get(200, 0) >= 5 and sum(n for s, n in seen.items() if 400 <= s < 500) >= 10, seen


def test_the_fuzzer_covers_every_endpoint(api_schema):
    operations = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"),
            ("DELETE", "/v1/adapters/{name}"), ("GET", "/v1/models"), ("GET", "/health")} <= operations  # fmt: skip
