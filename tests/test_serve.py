"""`deltatune serve` as a real process on 127.0.0.1, driven over HTTP: answers equal the in-process runtime,
concurrent requests for different adapters are batched together, and bad input gets a specific 4xx while the
server keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.runtime import generate

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADAPTERS = {"alpha": (2, ["q_proj", "v_proj"]), "beta-v2": (4, "all-linear")}
PROMPTS = ["good day", "the phone was", "awful movie", "my food is"]


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters_dir(tiny_causal_lm, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    model = _model(tiny_causal_lm)
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        key = name.replace("-", "_")
        dt.inject(
            model, dt.LoraConfig(r=r, lora_alpha=4 * r, target_modules=targets, init_lora_weights=False), key
        )
        dt.save_adapter(model, root / name, adapter_name=key)
    shutil.copytree(root / "alpha", root / "broken")  # weights that fail the sha256 check in deltatune.json
    weights = root / "broken" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_causal_lm, adapters_dir):
    port = _free_port()
    command = [
        sys.executable, "-m", "deltatune", "serve", "--base", str(tiny_causal_lm), "--base-name", "base",
        "--adapters-dir", str(adapters_dir), "--port", str(port), "--api-key-env", "DT_TEST_KEY",
        "--max-tokens", "8", "--max-prompt-tokens", "32", "--max-request-bytes", "4096",
        "--batch-window-ms", "100", "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env={**os.environ, "DT_TEST_KEY": KEY}, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start: {process.stderr.read()[-3000:]}")
        time.sleep(0.2)
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def expected(tiny_causal_lm, adapters_dir) -> dict[tuple[str, str], str]:
    """Greedy 6-token continuations computed in this process, one row at a time."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    for name in ADAPTERS:
        dt.load_adapter(model, adapters_dir / name, adapter_name=name.replace("-", "_"))
    answers = {}
    for model_id in ["base", *ADAPTERS]:
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            key = None if model_id == "base" else model_id.replace("-", "_")
            (done,) = generate(
                model, [ids], [key], max_new_tokens=6, pad_token_id=0, eos_token_id=tokenizer.eos_token_id
            )
            answers[(model_id, prompt)] = tokenizer.decode(done.tokens, skip_special_tokens=True)
    return answers


def _complete(client, model, prompt, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0} | extra
    return client.post("/v1/completions", json=body)


def test_models_and_auth(server):
    assert server.get("/health", headers={"Authorization": ""}).json()["status"] == "ok"  # needs no key
    denied = server.get("/v1/models", headers={"Authorization": ""})
    assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
    wrong = server.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ids = [m["id"] for m in server.get("/v1/models").json()["data"]]
    assert ids == ["base", "alpha", "beta-v2", "broken"]


def test_completions_equal_the_runtime_and_differ_per_adapter(server, expected):
    for (model_id, prompt), text in expected.items():
        response = _complete(server, model_id, prompt)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["text"] == text and body["model"] == model_id
        assert body["usage"]["completion_tokens"] <= 6
    per_model = {m: tuple(expected[(m, p)] for p in PROMPTS) for m in ["base", *ADAPTERS]}
    assert len(set(per_model.values())) == 3  # each adapter changes what is generated


def test_concurrent_requests_are_batched_across_adapters(server, expected):
    jobs = [(m, p) for m in ["base", *ADAPTERS] for p in PROMPTS]
    before = server.get("/health").json()["stats"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: _complete(server, *job), jobs))
    for job, response in zip(jobs, responses, strict=True):
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected[job]
    stats = server.get("/health").json()["stats"]
    assert stats["batches"] - before["batches"] < len(jobs)  # rows shared forwards
    assert stats["largest_batch"] > 1 and stats["most_adapters_in_batch"] >= 2


def test_chat_and_prompt_lists(server, expected):
    chat = server.post(
        "/v1/chat/completions",
        json={
            "model": "alpha",
            "messages": [{"role": "user", "content": "good day"}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    many = _complete(server, "beta-v2", PROMPTS[:2])
    assert [c["text"] for c in many.json()["choices"]] == [expected[("beta-v2", p)] for p in PROMPTS[:2]]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "not found"),
        ({"model": "../alpha", "prompt": "hi"}, 404, "not allowed"),
        ({"model": "alpha"}, 400, "prompt"),
        ({"model": "alpha", "prompt": "hi", "max_tokens": 100}, 400, "limit of 8"),
        ({"model": "alpha", "prompt": "hi " * 40}, 400, "limit is 32"),
        ({"model": "alpha", "prompt": "hi", "stream": True}, 400, "stream"),
        ({"model": "alpha", "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": "alpha", "prompt": "x" * 5000}, 413, "over the limit"),
        ({"model": "broken", "prompt": "hi"}, 409, "sha256"),
    ],
)
def test_bad_requests_get_specific_errors_and_the_server_survives(server, body, status, needle):
    response = server.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert _complete(server, "alpha", "good day").status_code == 200


def test_malformed_json(server):
    response = server.post(
        "/v1/completions",
        content=b'{"model": "alpha", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "json_invalid"


def test_load_and_unload(server):
    loaded = server.post("/v1/adapters", json={"name": "beta-v2"})
    assert loaded.status_code == 200 and loaded.json()["bytes"] > 0
    assert "beta-v2" in server.get("/health").json()["loaded_adapters"]
    assert server.delete("/v1/adapters/beta-v2").json() == {"name": "beta-v2", "loaded": False}
    assert "beta-v2" not in server.get("/health").json()["loaded_adapters"]
    assert server.delete("/v1/adapters/beta-v2").status_code == 404
    assert server.post("/v1/adapters", json={"name": "../../etc"}).status_code == 400
    assert _complete(server, "beta-v2", "good day").status_code == 200  # loads again on demand
    assert json.loads(server.get("/health").text)["status"] == "ok"
