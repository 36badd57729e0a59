"""`deltatune serve` as a real process on 127.0.0.1, driven over HTTP: answers equal the in-process runtime,
concurrent requests for different adapters are batched together, and bad input gets a specific 4xx while the
server keeps serving."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from serve_helpers import AUTH, running_server, saved_lora_adapters

import deltatune as dt
from deltatune.runtime import generate
from deltatune.runtime.sampling import Sampling

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ADAPTERS = {"alpha": (2, ["q_proj", "v_proj"]), "beta-v2": (4, "all-linear")}
PROMPTS = ["good day", "the phone was", "awful movie", "my food is"]


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters_dir(tiny_causal_lm, tmp_path_factory) -> Path:
    root = saved_lora_adapters(
        tiny_causal_lm, tmp_path_factory.mktemp("served"), ADAPTERS, init_lora_weights=False
    )
    shutil.copytree(root / "alpha", root / "broken")  # weights that fail the sha256 check in deltatune.json
    weights = root / "broken" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module", params=DEVICES)
def server(tiny_causal_lm, adapters_dir, request):
    """The server on each device (`--device`); its answers must equal the CPU reference below."""
    options = [
        "--max-tokens", "8", "--max-prompt-tokens", "32", "--max-request-bytes", "4096", "--batch-window-ms", "100",
        "--device", request.param,
    ]  # fmt: skip
    with (
        running_server(tiny_causal_lm, adapters_dir, *options) as (_, url),
        httpx.Client(base_url=url, headers=AUTH, timeout=600) as client,
    ):
        yield client


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
                model,
                [ids],
                [key],
                max_new_tokens=6,
                pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id,
                continuous=False,
            )
            answers[(model_id, prompt)] = tokenizer.decode(done.tokens, skip_special_tokens=True)
    return answers


def _complete(client, model, prompt, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0} | extra
    return client.post("/v1/completions", json=body)


@pytest.mark.slow
def test_models_and_auth(server):
    assert server.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}  # needs no key
    assert server.get("/health/details", headers={"Authorization": ""}).status_code == 401
    denied = server.get("/v1/models", headers={"Authorization": ""})
    assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
    wrong = server.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ids = [m["id"] for m in server.get("/v1/models").json()["data"]]
    assert ids == ["base", "alpha", "beta-v2", "broken"]


@pytest.mark.slow
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
    before = server.get("/health/details").json()["stats"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: _complete(server, *job), jobs))
    for job, response in zip(jobs, responses, strict=True):
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected[job]
    stats = server.get("/health/details").json()["stats"]
    assert stats["batches"] - before["batches"] < len(jobs)  # rows shared forwards
    assert stats["largest_batch"] > 1 and stats["most_adapters_in_batch"] >= 2


def test_chats_sharing_a_system_prompt_reuse_its_kv(server):
    """The server's prefix cache: the second chat under the same adapter and system prompt starts after it
    (the engine-level equality of answers is tests/test_prefix_cache.py's)."""
    system = "be calm"  # the test server takes prompts of up to 32 tokens

    def chat(text):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        body = {"model": "alpha", "messages": messages, "max_tokens": 3, "temperature": 0}
        response = server.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return server.get("/health/details").json()["prefix_cache"]

    first, second = chat("good day"), chat("awful movie")
    assert first["bytes"] > 0  # the first chat's prompt is stored
    assert second["hits"] == first["hits"] + 1 and second["tokens_reused"] - first["tokens_reused"] >= 8


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
        ({"model": "alpha", "prompt": "hi", "stream": True, "max_tokens": 100}, 400, "limit of 8"),
        ({"model": "alpha", "prompt": "hi", "n": 17}, 400, "n"),
        ({"model": "alpha", "prompt": ["hi"] * 9, "n": 2}, 400, "9 prompts x n=2 choices in one request"),
        ({"model": "alpha", "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream=true"),
        ({"model": "alpha", "prompt": "x" * 5000}, 413, "over the limit"),
        ({"model": "broken", "prompt": "hi"}, 409, "sha256"),
    ],
)
def test_bad_requests_get_specific_errors_and_the_server_survives(server, body, status, needle):
    response = server.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]
    assert _complete(server, "alpha", "good day").status_code == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_body_is_413_however_it_is_framed(server, framing):
    """A chunked body (no Content-Length) over the limit was answered 400 "error parsing the body"."""
    body = json.dumps({"model": "alpha", "prompt": "x" * 5000}).encode()
    content = (
        body if framing == "content-length" else iter([body[i : i + 512] for i in range(0, len(body), 512)])
    )
    response = server.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert "over the limit" in response.json()["error"]["message"]
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
    assert "beta-v2" in server.get("/health/details").json()["loaded_adapters"]
    assert server.delete("/v1/adapters/beta-v2").json() == {"name": "beta-v2", "loaded": False}
    assert "beta-v2" not in server.get("/health/details").json()["loaded_adapters"]
    assert server.delete("/v1/adapters/beta-v2").status_code == 404
    assert server.post("/v1/adapters", json={"name": "../../etc"}).status_code == 400
    assert _complete(server, "beta-v2", "good day").status_code == 200  # loads again on demand
    assert json.loads(server.get("/health").text)["status"] == "ok"


def _events(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.slow
def test_streamed_pieces_add_up_to_the_answer(server, expected):
    for model_id in ("base", "beta-v2"):
        for prompt in PROMPTS[:2]:
            body = {"model": model_id, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
            choices = [c["choices"][0] for c in _events(server, "/v1/completions", body)]
            assert "".join(c["text"] for c in choices) == expected[(model_id, prompt)]
            assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
            assert choices[-1]["finish_reason"] in ("length", "stop") and choices[-1]["text"] == ""
            assert len([c for c in choices if c["text"]]) >= 2  # in pieces, not all at the end


@pytest.mark.slow
def test_streaming_with_a_stop_string_and_in_chat(server, expected):
    (model_id, prompt), text = next(
        (job, text) for job, text in expected.items() if len(text) >= 6 and job[0] == "alpha"
    )
    stop = text[3:5]
    answer = _complete(server, model_id, prompt, stop=stop).json()
    plain = answer["choices"][0]
    # generation ended with the token completing the stop string, not at max_tokens (6)
    assert answer["usage"]["completion_tokens"] < 6
    body = {"model": model_id, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stop": stop}
    choices = [c["choices"][0] for c in _events(server, "/v1/completions", body | {"stream": True})]
    assert "".join(c["text"] for c in choices) == plain["text"] == text[: text.index(stop)]
    assert choices[-1]["finish_reason"] == plain["finish_reason"] == "stop"
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "good day"}], "max_tokens": 6}
    whole = server.post("/v1/chat/completions", json=chat | {"temperature": 0}).json()["choices"][0]
    chunks = _events(server, "/v1/chat/completions", chat | {"temperature": 0, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == whole["message"]["content"]
    assert chunks[-1]["object"] == "chat.completion.chunk" and chunks[-1]["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)  # OpenAI's chunks say null when not asked


@pytest.mark.slow
def test_stream_options_include_usage_counts_what_the_plain_answer_counts(server):
    """OpenAI's stream_options.include_usage: every chunk says usage: null, and one more chunk before [DONE],
    with no choices, carries the usage the same request gets unstreamed (stop strings included)."""
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    cases = [
        ("/v1/completions", {"model": "beta-v2", "prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0}),
        ("/v1/completions", {"model": "alpha", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0,
                             "stop": [" "]}),
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "good day"}],
                                  "max_tokens": 5, "temperature": 0}),
    ]  # fmt: skip
    for path, body in cases:
        plain = server.post(path, json=body).json()
        *chunks, last = _events(server, path, body | asked)
        assert last["choices"] == [] and last["usage"] == plain["usage"], (path, body)
        assert last["id"] == chunks[0]["id"] and last["object"] == chunks[0]["object"]
        assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
        assert plain["usage"]["completion_tokens"] > 0
    without = _events(server, "/v1/completions", cases[0][1] | {"stream": True})
    assert all("usage" not in c for c in without)  # OpenAI's default: no usage field at all
    off = _events(
        server, "/v1/completions", cases[0][1] | asked | {"stream_options": {"include_usage": False}}
    )
    assert all("usage" not in c for c in off) and all(c["choices"] for c in off)


@pytest.mark.slow
def test_seed_and_penalties_reach_the_rows_and_seeded_answers_repeat_amid_traffic(
    server, tiny_causal_lm, adapters_dir
):
    """The server's answer with a seed and OpenAI's penalties equals the runtime's for those settings, and
    the same seeded request answers the same alone and while other adapters' sampled rows share its batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    dt.load_adapter(model, adapters_dir / "beta-v2", adapter_name="beta_v2")
    settings = {
        "temperature": 1.0,
        "top_p": 0.9,
        "presence_penalty": 1.5,
        "frequency_penalty": 0.5,
        "seed": 5,
    }
    ids = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    (done,) = generate(
        model, [ids], ["beta_v2"], max_new_tokens=6, pad_token_id=0, eos_token_id=tokenizer.eos_token_id,
        sampling=Sampling(**settings),
    )  # fmt: skip
    seeded = _complete(server, "beta-v2", PROMPTS[1], **settings).json()["choices"][0]["text"]
    assert seeded == tokenizer.decode(done.tokens, skip_special_tokens=True)
    jobs = [("beta-v2", PROMPTS[1], settings)] * 3 + [
        (m, p, {"temperature": 1.0}) for m in ADAPTERS for p in PROMPTS
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: _complete(server, job[0], job[1], **job[2]).json(), jobs))
    assert [t["choices"][0]["text"] for t in texts[:3]] == [seeded] * 3
    others = {
        _complete(server, "beta-v2", PROMPTS[1], **(settings | {"seed": seed})).json()["choices"][0]["text"]
        for seed in range(4)
    }
    assert len(others) > 1  # the seed chooses the draws


@pytest.mark.slow
def test_logprobs_are_the_runtimes_in_openais_shapes(server, tiny_causal_lm, adapters_dir, expected):
    """/v1/completions' and /v1/chat/completions' log-probabilities equal the runtime's for the same rows;
    a stop string's cut drops the tokens after it from the log-probabilities as from the text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    dt.load_adapter(model, adapters_dir / "alpha", adapter_name="alpha")
    prompt = PROMPTS[0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    (done,) = generate(
        model, [ids], ["alpha"], max_new_tokens=6, pad_token_id=0, eos_token_id=tokenizer.eos_token_id,
        sampling=Sampling(logprobs=2),
    )  # fmt: skip
    choice = _complete(server, "alpha", prompt, logprobs=2).json()["choices"][0]
    chances = choice["logprobs"]
    # this tiny model's answers split characters across tokens: those are named by their bytes, and all
    # the tokens' bytes together are the answer
    assert any(name.startswith("bytes:") for name in chances["tokens"])
    assert choice["text"] == expected[("alpha", prompt)] == _joined(chances["tokens"])
    assert chances["token_logprobs"] == pytest.approx([c.logprob for c in done.logprobs], abs=1e-5)
    served_top = [lp for top in chances["top_logprobs"] for lp in top.values()]
    assert served_top == pytest.approx([lp for c in done.logprobs for _, lp in c.top], abs=1e-5)
    assert all(len(top) == 2 for top in chances["top_logprobs"])
    assert all(lp <= 0 for lp in chances["token_logprobs"])
    # where each token starts in the answer: a byte sequence never completed stays U+FFFD and counts
    offsets = [len(os.path.commonprefix([_joined(chances["tokens"][:i]), choice["text"]])) for i in range(6)]
    assert chances["text_offset"] == offsets == sorted(set(offsets))
    # greedy: each chosen token is the most likely one
    assert [max(top.values()) for top in chances["top_logprobs"]] == pytest.approx(chances["token_logprobs"])

    stop = chances["tokens"][2]
    cut = _complete(server, "alpha", prompt, logprobs=0, stop=stop).json()["choices"][0]
    kept = len(cut["logprobs"]["tokens"])
    assert _joined(cut["logprobs"]["tokens"]).startswith(cut["text"]) and kept <= 3
    assert cut["logprobs"]["token_logprobs"] == pytest.approx(chances["token_logprobs"][:kept], abs=1e-5)
    assert cut["logprobs"]["top_logprobs"] == [{}] * kept

    chat = {"model": "alpha", "messages": [{"role": "user", "content": "good day"}], "max_tokens": 4}
    answer = server.post(
        "/v1/chat/completions", json=chat | {"temperature": 0, "logprobs": True, "top_logprobs": 3}
    ).json()["choices"][0]
    content = answer["logprobs"]["content"]
    assert (
        bytes(b for c in content for b in c["bytes"]).decode(errors="replace") == answer["message"]["content"]
    )
    assert all(len(c["top_logprobs"]) == 3 for c in content)
    assert [c["logprob"] for c in content] == pytest.approx(
        [c["top_logprobs"][0]["logprob"] for c in content]
    )
    plain = server.post("/v1/chat/completions", json=chat | {"temperature": 0}).json()["choices"][0]
    assert plain["logprobs"] is None and plain["message"] == answer["message"]
    refused = server.post("/v1/chat/completions", json=chat | {"top_logprobs": 2})
    assert refused.status_code == 400 and "needs logprobs" in refused.json()["error"]["message"]


@pytest.mark.slow
def test_streamed_logprobs_add_up_to_the_non_streamed_ones(server, expected):
    """Each chunk carries the log-probabilities of the tokens whose text it completes; together they are the
    non-streamed answer's, stop string cut included, in both shapes."""
    completions = {"model": "alpha", "prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0, "logprobs": 2}
    plain = server.post("/v1/completions", json=completions).json()["choices"][0]
    text, chances = plain["text"], plain["logprobs"]
    # a stop string that starts exactly where a token does: that token is past the cut, and must not be sent
    stop = next(
        name
        for name, offset in zip(chances["tokens"][1:], chances["text_offset"][1:], strict=True)
        if name and not name.startswith("bytes:") and text.find(name) == offset
    )
    for body in (completions, completions | {"stop": stop}):
        whole = server.post("/v1/completions", json=body).json()["choices"]
        chunks = _events(server, "/v1/completions", body | {"stream": True})
        for index, choice in enumerate(whole):
            parts = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            assert "".join(p["text"] for p in parts) == choice["text"]
            joined = {key: [v for p in parts for v in p["logprobs"][key]] for key in choice["logprobs"]}
            assert joined == choice["logprobs"] and joined["tokens"], (body, index)
            assert sum(bool(p["logprobs"]["tokens"]) for p in parts) >= 2  # spread over the chunks
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "good day"}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = server.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    chunks = _events(server, "/v1/chat/completions", chat | {"stream": True})
    assert [e for c in chunks for e in c["choices"][0]["logprobs"]["content"]] == whole and whole


@pytest.mark.slow
def test_echo_scores_a_continuation_as_an_evaluation_harness_asks(server, tiny_causal_lm, adapters_dir):
    """lm-evaluation-harness' log-likelihood request (token ids, echo, logprobs=1, max_tokens=1, temperature
    0): the prompt's tokens come back scored as the runtime scores them, the first with None, then the new
    token; a greedy continuation is greedy by the harness' test. max_tokens 0 scores the prompt alone."""
    from transformers import AutoTokenizer

    from deltatune.runtime.scoring import prompt_logprobs

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    dt.load_adapter(model, adapters_dir / "beta-v2", adapter_name="beta_v2")
    context = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    (greedy,) = generate(model, [context], ["beta_v2"], max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    ids = context + greedy.tokens
    (reference,) = prompt_logprobs(model, [ids], ["beta_v2"], top=1)
    body = {"model": "beta-v2", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True,
            "seed": 1234}  # fmt: skip
    choice = server.post("/v1/completions", json=body).json()["choices"][0]
    chances = choice["logprobs"]
    assert len(chances["tokens"]) == len(ids) + 1 and chances["token_logprobs"][0] is None
    assert chances["top_logprobs"][0] is None
    assert chances["token_logprobs"][1 : len(ids)] == pytest.approx([r.logprob for r in reference], abs=1e-5)
    continuation = slice(len(context), -1)  # the harness' [ctxlen:-1]: the continuation, not the new token
    assert all(
        lp == max(top.values())
        for lp, top in zip(
            chances["token_logprobs"][continuation], chances["top_logprobs"][continuation], strict=True
        )
    )  # the greedy continuation is greedy by the harness' test
    plain = server.post("/v1/completions", json=body | {"echo": False}).json()["choices"][0]
    assert choice["text"] == tokenizer.decode(ids) + plain["text"]
    assert chances["token_logprobs"][-1] == pytest.approx(plain["logprobs"]["token_logprobs"][0], abs=1e-5)
    assert chances["text_offset"][len(ids)] == len(tokenizer.decode(ids))

    alone = server.post("/v1/completions", json=body | {"max_tokens": 0}).json()
    assert alone["choices"][0]["text"] == tokenizer.decode(ids) and alone["usage"]["completion_tokens"] == 0
    assert alone["choices"][0]["logprobs"]["token_logprobs"] == chances["token_logprobs"][: len(ids)]
    for bad, needle in (
        ({"echo": False, "max_tokens": 0}, "only with echo"),
        ({"stream": True}, "not streamed"),
    ):
        refused = server.post("/v1/completions", json=body | bad)
        assert refused.status_code == 400 and needle in refused.json()["error"]["message"]


def _joined(names: list[str]) -> str:
    """The text of tokens named as /v1/completions' logprobs name them (text, or "bytes:\\xNN...")."""
    raw = b"".join(
        bytes.fromhex(name[6:].replace("\\x", "")) if name.startswith("bytes:") else name.encode()
        for name in names
    )
    return raw.decode(errors="replace")


@pytest.mark.slow
def test_logit_bias_reaches_the_rows(server, tiny_causal_lm):
    """OpenAI's logit_bias (token ids as strings): 100 makes its token the only choice, -100 bans the greedy
    answer's first token; in chat too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    forced = _complete(server, "alpha", PROMPTS[0], temperature=1.0, logit_bias={"42": 100}).json()
    assert forced["choices"][0]["text"] == tokenizer.decode([42] * 6)
    greedy = _complete(server, "alpha", PROMPTS[0]).json()["choices"][0]
    first = tokenizer(greedy["text"], add_special_tokens=False)["input_ids"][0]
    banned = _complete(server, "alpha", PROMPTS[0], logit_bias={str(first): -100}).json()
    assert banned["choices"][0]["text"] != greedy["text"]
    chat = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "logit_bias": {"7": 100},
    }
    answer = server.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert answer == tokenizer.decode([7] * 3)


def test_chat_takes_max_completion_tokens_as_its_token_limit(server):
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "good day"}], "temperature": 0}
    short = server.post("/v1/chat/completions", json=chat | {"max_completion_tokens": 2}).json()
    same = server.post("/v1/chat/completions", json=chat | {"max_tokens": 2}).json()
    assert short["usage"]["completion_tokens"] == 2 and short["choices"] == same["choices"]
    both = server.post("/v1/chat/completions", json=chat | {"max_tokens": 3, "max_completion_tokens": 2})
    assert both.status_code == 400 and "send one of them" in both.json()["error"]["message"]
    over = server.post("/v1/chat/completions", json=chat | {"max_completion_tokens": 100})
    assert over.status_code == 400 and "limit of 8" in over.json()["error"]["message"]


@pytest.mark.slow
def test_n_choices_per_prompt_in_openais_order_each_seeded_apart(server, expected):
    """n rows per prompt, choice i*n+j for prompt i; the first choice is the n=1 answer, the others their
    own seeded draws, all repeating; usage counts each prompt once. Streamed, each choice's pieces add up to
    its non-streamed text, and each choice's first delta names the role."""
    sampled = {"temperature": 1.0, "seed": 9, "max_tokens": 6}
    body = {"model": "beta-v2", "prompt": PROMPTS[:2], "n": 3} | sampled
    answer = server.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in answer["choices"]]
    assert [c["index"] for c in answer["choices"]] == list(range(6))
    singles = [server.post("/v1/completions", json=body | {"prompt": p, "n": 1}).json() for p in PROMPTS[:2]]
    assert [texts[0], texts[3]] == [one["choices"][0]["text"] for one in singles]
    assert len(set(texts[:3])) > 1 and len(set(texts[3:])) > 1  # the choices are draws of their own
    assert [c["text"] for c in server.post("/v1/completions", json=body).json()["choices"]] == texts
    assert answer["usage"]["prompt_tokens"] == sum(one["usage"]["prompt_tokens"] for one in singles)
    greedy = _complete(server, "alpha", PROMPTS[0], n=2).json()["choices"]
    assert [c["text"] for c in greedy] == [expected[("alpha", PROMPTS[0])]] * 2

    chat = {"model": "alpha", "messages": [{"role": "user", "content": "good day"}], "n": 3} | sampled
    whole = server.post("/v1/chat/completions", json=chat).json()
    chunks = _events(
        server, "/v1/chat/completions", chat | {"stream": True, "stream_options": {"include_usage": True}}
    )
    *chunks, last = chunks
    for index, choice in enumerate(whole["choices"]):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == index]
        assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
        assert "".join(d.get("content", "") for d in deltas) == choice["message"]["content"]
    assert last["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] > 6


def test_streaming_and_plain_requests_share_batches(server, expected):
    jobs = [("alpha", p, True) for p in PROMPTS[:2]] + [("beta-v2", p, False) for p in PROMPTS[:2]]

    def run(job):
        model_id, prompt, streaming = job
        if not streaming:
            return _complete(server, model_id, prompt).json()["choices"][0]["text"]
        body = {"model": model_id, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
        return "".join(c["choices"][0]["text"] for c in _events(server, "/v1/completions", body))

    before = server.get("/health/details").json()["stats"]["batches"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(run, jobs))
    assert texts == [expected[(m, p)] for m, p, _ in jobs]
    assert server.get("/health/details").json()["stats"]["batches"] - before < len(jobs)


class _ByteTokenizer:
    """Token i is byte i: a character of several UTF-8 bytes spans several tokens."""

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_text_deltas_hold_back_split_characters_and_possible_stops():
    from deltatune.serve.streaming import TextDeltas

    def pieces(text: str, stops: list[str]) -> list[str]:
        deltas = TextDeltas(_ByteTokenizer(), stops)
        out = [deltas.add(b) for b in text.encode()]
        final = text[: min([text.index(s) for s in stops if s in text], default=len(text))]
        return out + [deltas.rest(final)]

    got = pieces("café!", [])
    assert got == ["c", "a", "f", "", "é", "!", ""]  # the first byte of é alone decodes to U+FFFD: held
    got = pieces("ab END cd", ["END"])
    assert "".join(got) == "ab " and "E" not in "".join(got[:5])  # "E", "EN" waited: they could start END
    got = pieces("ab EX", ["END"])
    assert "".join(got) == "ab EX" and got[3:5] == ["", "EX"]  # released once it cannot be END


def test_streamed_tokens_settle_with_their_text_at_the_offsets_a_whole_answer_gives():
    """A character split over three tokens: its tokens settle once it is sent, all at its offset, as
    `token_offsets` counts a whole answer; bytes never completed keep their place."""
    from deltatune.serve.logprobs import token_offsets
    from deltatune.serve.streaming import TextDeltas

    for text in (b"a\xe2\x82\xacb", b"a\xe2\x82b", b"ab"):
        deltas = TextDeltas(_ByteTokenizer(), [], track_tokens=True)
        settled = []
        for byte in text:
            deltas.add(byte)
            settled.append(deltas.settled())
        assert len(deltas.prefixes) == len(text) + 1  # nothing forgotten yet
        whole = _ByteTokenizer().decode(list(text))
        deltas.rest(whole)
        offsets = token_offsets(_ByteTokenizer(), list(text))
        assert [deltas.start(k) for k in range(len(text))] == offsets
        assert deltas.settled() == len(text) and deltas.sent == whole
        if text == b"a\xe2\x82\xacb":
            assert settled == [1, 1, 1, 4, 5] and offsets == [0, 1, 1, 1, 2]
        if text == b"a\xe2\x82b":  # one U+FFFD for the unfinished bytes, its first token's: all settle with b
            assert settled == [1, 1, 1, 4] and offsets == [0, 1, 2, 2]
            deltas.forget(3)  # handed out: what those tokens needed goes
            assert min(deltas.prefixes) == 3 and deltas.start(3) == offsets[3]
    untracked = TextDeltas(_ByteTokenizer(), [])
    assert "".join(untracked.add(b) for b in b"abc") == "abc" and untracked.prefixes is None


@pytest.mark.slow
def test_engine_ends_a_row_whose_reader_left(tiny_causal_lm, adapters_dir):
    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine, Row

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    engine = Engine(model, tokenizer, AdapterCache(model, adapters_dir), batch_window_s=0.5)
    ids = tokenizer("good day", add_special_tokens=False)["input_ids"]
    leaving, staying = Row(ids, "alpha", 8), Row(ids, "alpha", 8)
    # the stream's reader goes away after its second token (the app sets `cancelled` when the client closes)
    leaving.on_token = lambda *_: setattr(leaving, "cancelled", leaving.streamed >= 1)
    try:
        left, stayed = (f.result(timeout=600) for f in [engine.submit(leaving), engine.submit(staying)])
    finally:
        engine.close()
    assert stayed.finish_reason == "length" and len(stayed.tokens) == 8  # same batch, not held back
    assert left.finish_reason == "cancelled" and left.tokens == stayed.tokens[:2]
    assert engine.stats.cancelled_rows == 1 and engine.stats.batches == 1


@pytest.mark.slow
def test_engine_ends_a_row_at_its_stop_string(tiny_causal_lm, adapters_dir):
    """Not streamed and not cut afterwards: the row stops generating at the token that completes its stop
    string, while a row without one in the same batch runs to its limit."""
    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine, Row

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    engine = Engine(model, tokenizer, AdapterCache(model, adapters_dir), batch_window_s=0.5)
    ids = tokenizer("good day", add_special_tokens=False)["input_ids"]
    try:
        free = engine.submit(Row(ids, "alpha", 12)).result(timeout=600)
        texts = [tokenizer.decode(free.tokens[:n], skip_special_tokens=True) for n in range(13)]
        # a stop string that the 3rd-7th new token completes
        n, stop = next((n, t[-2:]) for n, t in enumerate(texts) if 3 <= n <= 7 and t[-2:] not in texts[n - 1])
        stopping, plain = Row(ids, "alpha", 12, stops=[stop]), Row(ids, "alpha", 12)
        stopped, ran = (f.result(timeout=600) for f in [engine.submit(stopping), engine.submit(plain)])
    finally:
        engine.close()
    assert stopped.tokens == free.tokens[:n] and stopped.finish_reason == "stop"
    assert ran.tokens == free.tokens and ran.finish_reason == "length"
    assert engine.stats.rows_ended_at_stop_string == 1 and engine.stats.cancelled_rows == 0
    assert engine.stats.batches == 2  # the two rows shared one batch


def test_engine_rows_join_a_running_batch_and_leave_when_done(tiny_causal_lm, adapters_dir):
    """Continuous batching: a short request arriving while a long one decodes joins at the next step and is
    answered long before the long one ends, with the tokens it gets alone."""
    import threading

    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine, Row

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    engine = Engine(model, tokenizer, AdapterCache(model, adapters_dir), batch_window_s=0.05)
    long_ids, short_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPTS[:2])
    try:
        alone = engine.submit(Row(short_ids, "beta-v2", 3)).result(timeout=600)
        long_alone = engine.submit(Row(long_ids, "alpha", 40)).result(timeout=600)
        started = threading.Event()
        long_row = Row(long_ids, "alpha", 40, on_token=lambda *_: started.set())
        long_future = engine.submit(long_row)
        assert started.wait(timeout=600)
        short = Row(short_ids, "beta-v2", 3)
        long_progress = []  # the long row's tokens when the short one is answered (on the engine thread)
        short_future = engine.submit(short)
        short_future.add_done_callback(lambda _: long_progress.append(long_row.streamed))
        joined, ran = short_future.result(timeout=600), long_future.result(timeout=600)
    finally:
        engine.close()
    assert joined.tokens == alone.tokens and joined.finish_reason == alone.finish_reason
    assert ran.tokens == long_alone.tokens and len(ran.tokens) == 40
    assert 1 <= long_progress[0] < 40 - 3  # answered while the long row was still decoding
    assert engine.stats.largest_batch == 2 and engine.stats.batches == 4
    assert engine.decoding.stack_bytes > 0 and len(engine.decoding) == 0  # stacks kept for the next rows


@pytest.mark.slow
def test_engine_serves_adapters_that_cannot_join_the_decode_batch(tiny_causal_lm, adapters_dir, tmp_path):
    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine, Row

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    torch.manual_seed(3)
    config = dt.Ia3Config(target_modules=["k_proj", "down_proj"], init_ia3_weights=False)
    dt.inject(model, config, "s")  # random scaling vectors: an IA3 adapter that changes the output
    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "alpha", root / "alpha")
    dt.save_adapter(model, root / "scaled", adapter_name="s")
    dt.delete_adapter(model, "s")
    engine = Engine(model, tokenizer, AdapterCache(model, root), batch_window_s=0.3)
    ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    try:
        rows = [Row(ids, "scaled", 6), Row(ids, "alpha", 6), Row(ids, None, 6)]
        scaled, alpha, base = (f.result(timeout=600) for f in [engine.submit(r) for r in rows])
    finally:
        engine.close()
    reference = _model(tiny_causal_lm)
    dt.load_adapter(reference, root / "scaled", adapter_name="s")
    dt.load_adapter(reference, root / "alpha", adapter_name="a")
    expected = generate(
        reference, [ids] * 3, ["s", "a", None], max_new_tokens=6, pad_token_id=0,
        eos_token_id=tokenizer.eos_token_id, continuous=False,
    )  # fmt: skip
    assert [scaled.tokens, alpha.tokens, base.tokens] == [e.tokens for e in expected]
    assert scaled.tokens != base.tokens
    assert engine.stats.batches == 2  # the LoRA and base rows joined the decode batch; the IA3 row ran apart


@pytest.mark.slow
def test_engine_a_row_failing_its_prefill_fails_alone(tiny_causal_lm, adapters_dir):
    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.serve.engine import Engine, Row

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    engine = Engine(model, tokenizer, AdapterCache(model, adapters_dir), batch_window_s=0.3)
    ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    try:
        alone = engine.submit(Row(ids, "alpha", 4)).result(timeout=600)
        good, bad = Row(ids, "alpha", 4), Row([10**6], "beta-v2", 4)  # a token id outside the vocabulary
        futures = [engine.submit(good), engine.submit(bad)]
        with pytest.raises(IndexError):
            futures[1].result(timeout=600)
        assert futures[0].result(timeout=600).tokens == alone.tokens
        assert engine.submit(Row(ids, None, 2)).result(timeout=600).finish_reason in ("length", "stop")
    finally:
        engine.close()
    assert engine.stats.failed_rows == 1


@pytest.mark.slow
def test_engine_falls_back_to_fixed_batches_for_a_model_it_cannot_decode(
    tiny_causal_lm, adapters_dir, monkeypatch
):
    from transformers import AutoTokenizer

    from deltatune.runtime import AdapterCache
    from deltatune.runtime.decode import ContinuousBatchingUnsupported, DecodeBatch
    from deltatune.serve.engine import Engine, Row

    def refuse(self, *args, **kwargs):
        raise ContinuousBatchingUnsupported("this model's KV cache cannot be merged")

    monkeypatch.setattr(DecodeBatch, "add", refuse)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = _model(tiny_causal_lm)
    engine = Engine(model, tokenizer, AdapterCache(model, adapters_dir), batch_window_s=0.3)
    ids = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    try:
        answers = [f.result(timeout=600) for f in [engine.submit(Row(ids, "alpha", 5)) for _ in range(2)]]
        later = engine.submit(Row(ids, "alpha", 5)).result(timeout=600)
    finally:
        engine.close()
    reference = _model(tiny_causal_lm)
    dt.load_adapter(reference, adapters_dir / "alpha", adapter_name="a")
    (expected,) = generate(
        reference,
        [ids],
        ["a"],
        max_new_tokens=5,
        pad_token_id=0,
        eos_token_id=tokenizer.eos_token_id,
        continuous=False,
    )
    assert [a.tokens for a in answers] == [expected.tokens] * 2 and later.tokens == expected.tokens
    assert not engine.continuous and engine.stats.decode_steps == 0 and engine.stats.batches == 2


def test_token_bytes_read_byte_level_and_byte_fallback_spellings():
    from tokenizers import pre_tokenizers

    from deltatune.serve.logprobs import _byte_of_symbol, token_bytes

    alphabet = _byte_of_symbol()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(alphabet.values()) == list(
        range(256)
    )
    assert alphabet["Ġ"] == ord(" ") and alphabet["a"] == ord("a")

    class Spelled:
        """A token whose own text is only part of a character: its bytes come from its spelling."""

        def __init__(self, spelling):
            self.spelling = spelling

        def decode(self, tokens, skip_special_tokens=True):
            return "\ufffd"

        def convert_ids_to_tokens(self, token):
            return self.spelling

    ((euro, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str("€")
    assert token_bytes(Spelled(euro[:2]), 0) == "€".encode()[:2]  # byte-level BPE: bytes e2 82 of e2 82 ac
    assert token_bytes(Spelled("<0xE2>"), 0) == b"\xe2"  # SentencePiece byte fallback
    assert token_bytes(Spelled("▁und"), 0) is None  # neither: no bytes to show


def test_tokenizer_endpoints_match_what_the_completions_run(server, tiny_causal_lm):
    """vLLM's /tokenizer_info, /tokenize and /detokenize (what lm-evaluation-harness' remote tokenizer
    asks): the ids are those a completion prompt or a chat would run, and they decode back."""
    from transformers import AutoTokenizer

    from deltatune.data.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    info = server.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    text = "good day <|im_end|> to you"  # a typed special token stays text, as in a prompt
    ids = server.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert ids == tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token_id not in ids
    assert server.post("/detokenize", json={"tokens": ids}).json()["prompt"] == text
    by_ids = _complete(server, "alpha", ids).json()["choices"][0]["text"]
    assert by_ids == _complete(server, "alpha", text).json()["choices"][0]["text"]
    messages = [{"role": "user", "content": "good day"}]
    chat = server.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == PromptRenderer(tokenizer).chat_ids(messages) and chat["count"] == len(
        chat["tokens"]
    )
    for body, needle in (
        ({"tokens": [10**6]}, "outside the vocabulary"),
        ({"prompt": "x", "messages": messages}, "not both"),
    ):
        path = "/detokenize" if "tokens" in body else "/tokenize"
        refused = server.post(path, json=body)
        assert refused.status_code == 400 and needle in refused.json()["error"]["message"]
    assert server.get("/tokenizer_info", headers={"Authorization": ""}).status_code == 401


class _Counting:
    """A tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, tokens, skip_special_tokens=True):
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)


def _metaspace_tokenizer():
    """SentencePiece's way with spaces (▁, no leading space in the text of the first token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from train_helpers import _corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        _corpus() + ["café 東京 👋🏽 naïve"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    )
    return tok


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["byte-level BPE", "WordPiece", "Metaspace", "bytes"])
def test_token_offsets_take_linear_time_and_equal_decoding_every_prefix(kind, tiny_causal_lm, tiny_bert):
    """An echoed 2,000-token prompt's offsets once decoded every prefix (16.9 s stalls in the server): now a
    few tokens are decoded per token, with the same offsets as decoding every prefix."""
    from transformers import AutoTokenizer

    from deltatune.serve.logprobs import token_offsets

    text = "Hello wörld, naïve café: 東京 👋🏽 x = f(a, b)\n" * 40
    if kind == "bytes":
        tokenizer, tokens = _ByteTokenizer(), list(text.encode())[:1500] + [0xE2, 0x82]  # ends mid-character
    elif kind == "Metaspace":
        tokenizer = _metaspace_tokenizer()
        tokens = tokenizer.encode(text).ids
    else:
        tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm if kind == "byte-level BPE" else tiny_bert)
        tokens = tokenizer(text, add_special_tokens=kind == "WordPiece")["input_ids"]
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    from deltatune.serve.logprobs import shared_length

    expected = [
        shared_length(tokenizer.decode(tokens[:i], skip_special_tokens=True), whole)
        for i in range(len(tokens))
    ]
    counting = _Counting(tokenizer)
    assert token_offsets(counting, tokens) == expected
    assert len(tokens) > 500 and counting.decoded <= 20 * len(tokens)  # quadratic would be len**2 / 2
