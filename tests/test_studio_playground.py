"""The studio's playground over HTTP (FastAPI's test client): a base model loads on request, chats with the
base and with run adapters answer as transformers' `generate` and `deltatune serve` do, streamed or not, under
serve's own limits; names that leave the runs folder, runs without an adapter, a missing base and chats posted
without the page's token are refused; an adapter a run rewrites is reloaded at its next chat.
tests/test_studio_browser.py chats in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
import yaml

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import saved_lora_adapters  # noqa: E402

from deltatune.serve import build_server  # noqa: E402
from deltatune.studio import create_app  # noqa: E402

GUARD_S = 600  # hang guard only: the waits below end when the state changes
CHAT = "/playground/api/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "good day to you"}]


def _run(root, name, base, adapter=None):
    folder = root / name
    folder.mkdir(parents=True)
    config = {
        "model": {"path": str(base)},
        "data": {"system_prompt": "be brief"},
        "adapter": {"method": "lora"},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if adapter is not None:
        shutil.copytree(adapter, folder / "adapter")
    return folder


@pytest.fixture(scope="module")
def saved(tiny_causal_lm, tmp_path_factory):
    adapters = {"first": (4, "all-linear"), "second": (2, ["q_proj", "v_proj"])}
    return saved_lora_adapters(tiny_causal_lm, tmp_path_factory.mktemp("saved"), adapters, b_std=0.5)


@pytest.fixture
def studio(tiny_causal_lm, saved, tmp_path):
    root = tmp_path / "runs"
    _run(root, "alpha", tiny_causal_lm, saved / "first")
    _run(root, "group/beta", tiny_causal_lm, saved / "second")
    _run(root, "bare", tiny_causal_lm)  # no adapter kept yet
    with TestClient(create_app(root), base_url="http://127.0.0.1:7860") as client:
        page = client.get("/playground")
        client.headers["x-studio-token"] = re.search(r'name="studio-token" content="([^"]+)"', page.text)[1]
        yield root, client


def _ready(client, base) -> dict:
    form = {"base": str(base), "token": client.headers["x-studio-token"]}
    assert client.post("/playground/base", data=form, follow_redirects=False).status_code == 303
    deadline = time.monotonic() + GUARD_S
    while (state := client.get("/api/playground").json())["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return state


def _chat(client, model, **extra):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, **extra}
    return client.post(CHAT, json=body)


def _streamed(client, model) -> tuple[str, int]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True}
    pieces = []
    with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces += [delta["content"]] if delta.get("content") else []
    return "".join(pieces), len(pieces)


def test_chats_answer_as_generate_and_serve_do_streamed_or_not(studio, tiny_causal_lm, saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, client = studio
    state = _ready(client, tiny_causal_lm)
    assert state == {
        "state": "ready",
        "base": str(tiny_causal_lm),
        "error": None,
        "runs": ["group/beta", "alpha"],
    }

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    oracle = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    base = _chat(client, str(tiny_causal_lm)).json()["choices"][0]["message"]["content"]
    assert base == oracle

    serve_app, engine = build_server(str(tiny_causal_lm), saved)
    try:
        with TestClient(serve_app) as served:
            for run, adapter in (("alpha", "first"), ("group/beta", "second")):
                answer = _chat(client, run).json()["choices"][0]["message"]["content"]
                body = {"model": adapter, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
                expected = served.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
                assert answer == expected["content"] and answer != base
                text, pieces = _streamed(client, run)
                assert text == answer and pieces > 1
    finally:
        engine.close()


def test_refusals_name_the_problem(studio, tiny_causal_lm):
    root, client = studio
    missing = _chat(client, "alpha")
    assert missing.status_code == 503 and "base model is not loaded" in missing.json()["error"]["message"]
    foreign = client.post(CHAT, json={}, headers={"x-studio-token": "stale"})
    assert foreign.status_code == 403 and "page token" in foreign.text

    failed = _ready(client, root / "no-such-model")
    assert failed["state"] == "failed" and "no-such-model does not exist" in failed["error"]
    _ready(client, tiny_causal_lm)
    (root / "out").mkdir()
    (root / "link").mkdir()
    (root / "link" / "config.yaml").write_text("model: {path: x}\n")
    (root / "link" / "adapter").symlink_to(root / ".." / "elsewhere", target_is_directory=True)
    (root / ".." / "elsewhere").mkdir()
    for name, status, needle in [
        ("../alpha", 404, "leads outside the studio's runs folder"),
        ("bare", 404, "run 'bare' has no adapter yet"),
        ("link", 404, "leads outside"),
        ("alpha", 400, "over this server's limit of 512"),  # serve's own limits
    ]:
        reply = _chat(client, name, **({"max_tokens": 513} if name == "alpha" else {}))
        assert reply.status_code == status and needle in reply.json()["error"]["message"], reply.text


def test_an_adapter_its_run_rewrites_answers_anew(studio, tiny_causal_lm, saved):
    root, client = studio
    _ready(client, tiny_causal_lm)
    before = _chat(client, "alpha").json()["choices"][0]["message"]["content"]
    beta = _chat(client, "group/beta").json()["choices"][0]["message"]["content"]
    staging = root / "alpha" / ".adapter-new"  # a checkpoint replaces the folder in one rename
    shutil.copytree(saved / "second", staging)
    shutil.rmtree(root / "alpha" / "adapter")
    staging.rename(root / "alpha" / "adapter")
    after = _chat(client, "alpha").json()["choices"][0]["message"]["content"]
    assert after == beta != before


def test_the_page_lists_bases_and_a_runs_page_links_its_chat(studio, tiny_causal_lm):
    root, client = studio
    page = client.get("/playground?run=alpha")  # starts loading the run's base
    assert page.status_code == 200 and f'<option value="{tiny_causal_lm}">' in page.text
    assert 'data-chosen="alpha"' in page.text and 'value="be brief"' in page.text
    assert client.get("/api/playground").json()["base"] == str(tiny_causal_lm)
    assert 'href="/playground?run=alpha"' in client.get("/runs/alpha").text
    assert 'id="chat"' not in client.get("/runs/bare").text


def test_beyond_loopback_the_chat_api_needs_the_key(tiny_causal_lm, tmp_path):
    with TestClient(
        create_app(tmp_path, api_key="k", loopback_only=False), base_url="http://studio.lan"
    ) as c:
        assert c.post(CHAT, json={}).status_code == 401
        assert c.get("/playground/api/v1/models").status_code == 401
        with_key = c.get("/playground/api/v1/models", headers={"authorization": "Bearer k"})
        assert with_key.status_code == 503 and "is not loaded" in with_key.text  # past the guard


def test_a_chat_whose_page_goes_away_ends_at_its_next_token(studio, tiny_causal_lm, monkeypatch):
    """Stop (or a closed tab) drops the stream's connection; through the studio's own middleware the row is
    cancelled in the engine as a served one is, instead of decoding on to max_tokens."""
    import asyncio

    from deltatune.runtime.decode import DecodeBatch

    root, client = studio
    _ready(client, tiny_causal_lm)
    real_step = DecodeBatch.step

    def slow_step(self):
        time.sleep(0.02)  # 512 tokens would take 10 s
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 512, "temperature": 0, "stream": True}
    raw = json.dumps(body).encode()

    async def page_that_leaves() -> list[bytes]:
        pieces: list[bytes] = []
        first = asyncio.Event()
        request = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive() -> dict:
            if request:
                return request.pop(0)
            await first.wait()  # connected until the first piece of the answer arrives
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                pieces.append(message["body"])
                first.set()

        headers = [(b"host", b"127.0.0.1:7860"), (b"content-type", b"application/json"),
                   (b"content-length", str(len(raw)).encode()), (b"x-studio-token", client.headers["x-studio-token"].encode())]  # fmt: skip
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 7860)}  # fmt: skip
        await client.app(scope, receive, send)
        return pieces

    pieces = asyncio.run(page_that_leaves())
    assert pieces and b"[DONE]" not in b"".join(pieces)
    details = "/playground/api/health/details"
    deadline = time.monotonic() + GUARD_S  # a hang guard: the row ends at its next token
    while (stats := client.get(details).json()["stats"])["cancelled_rows"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stats["cancelled_rows"] == 1 and client.get(details).json()["in_flight"] == 0
