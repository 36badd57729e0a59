"""The HTTP endpoints. `/health` answers anyone; every other route sits on the `protected` router, whose
dependency checks the API key first. Handlers reach the app's `Service` through the `service` dependency."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..runtime import Completion
from ..runtime.sampling import TokenLogprob
from .logprobs import chat_shape, completion_shape, for_answer, prompt_shape, with_prompt
from .schemas import AdapterLoadRequest, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .service import Service, usage


def service(request: Request) -> Service:
    return request.app.state.service


def authorize(request: Request) -> None:
    service(request).authorize(request)


Served = Annotated[Service, Depends(service)]
public = APIRouter()
protected = APIRouter(dependencies=[Depends(authorize)])


@public.get("/health")
async def health(s: Served) -> JSONResponse:
    """Liveness for anyone (load balancers): 200 while the engine runs, else 503."""
    if s.engine.alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "engine stopped"}, 503)


@protected.get("/health/details")
async def health_details(s: Served) -> dict:
    engine, cache = s.engine, s.cache
    return {
        "status": "ok" if engine.alive else "engine stopped",
        "engine_failure": None if engine.failure is None else type(engine.failure).__name__,
        "uptime_s": round(time.time() - s.started, 1),
        "loaded_adapters": [e.name for e in cache.loaded],
        "cache_bytes": cache.bytes_used,
        "free_slot_bytes": cache.free_slot_bytes,
        "decode_stack_bytes": engine.decoding.stack_bytes,
        "in_flight": engine.in_flight,
        "stats": asdict(engine.stats),
        "prefix_cache": None
        if engine.prefixes is None
        else {"bytes": engine.prefixes.bytes_used, **asdict(engine.prefixes.stats)},
    }


@protected.get("/v1/openapi.json", include_in_schema=False)
async def openapi(http: Request) -> dict:
    """The API's schema, for clients and the fuzzer (behind the key, like everything but liveness)."""
    return http.app.openapi()


@protected.get("/v1/models")
async def models(s: Served) -> dict:
    loaded = {e.name for e in s.cache.loaded}
    data = [{"id": s.base_name, "object": "model", "owned_by": "deltatune", "adapter": False}]
    data += [
        {"id": name, "object": "model", "owned_by": "deltatune", "adapter": True, "loaded": name in loaded}
        for name in s.cache.available()
    ]
    return {"object": "list", "data": data}


@protected.post("/v1/completions")
async def completions(http: Request, request: CompletionRequest, s: Served) -> Any:
    prompts = await s.encoded(request)
    if request.stream:
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": request.model}  # fmt: skip

        def choice(index: int, text: str, reason: str | None) -> dict:
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

        return s.stream(request, prompts, head, choice, completion_shape)
    results, scores = await s.complete_echoed(http, request, prompts)
    # off the event loop: a long echoed prompt's offsets and names take a while, and /health must answer
    choices = await asyncio.to_thread(completion_choices, s, request, prompts, results, scores)
    return _envelope("cmpl", "text_completion", request, choices, results)


def completion_choices(
    s: Service,
    request: CompletionRequest,
    prompts: list[list[int]],
    results: list[Completion],
    scores: list[list[TokenLogprob]] | None,
) -> list[dict]:
    """The choices of a completions answer: text (the prompt's in front with echo), finish reason and
    log-probabilities. An echoed prompt's text and offsets are worked out once for its `n` choices."""
    echoed: dict[int, tuple[str, dict | None]] = {}
    choices = []
    for i, result in enumerate(results):
        text, reason = s.text_of(result, request.stops())
        chances = None
        if request.logprobs is not None:
            chances = for_answer(completion_shape, s.tokenizer, result.tokens, result.logprobs, text)
        if request.echo:  # the prompt in front, as the tokenizer reads it back
            which = i // request.n
            if which not in echoed:
                prompt = prompts[which]
                prompt_text = s.tokenizer.decode(prompt, skip_special_tokens=True)
                scored = prompt_shape(s.tokenizer, prompt, scores[which]) if scores is not None else None
                echoed[which] = prompt_text, scored
            prompt_text, scored = echoed[which]
            if chances is not None:
                chances = with_prompt(scored, len(prompt_text), chances)
            text = prompt_text + text
        choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": chances})
    return choices


@protected.post("/v1/chat/completions")
async def chat(http: Request, request: ChatRequest, s: Served) -> Any:
    prompt = await s.chat_prompt(request)
    if request.stream:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request.model}  # fmt: skip
        started: set[int] = set()

        def choice(index: int, text: str, reason: str | None) -> dict:
            delta = {"content": text} if text else {}
            if index not in started:  # OpenAI's first delta of each choice names the role
                delta = {"role": "assistant", **delta}
                started.add(index)
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

        return s.stream(request, [prompt], head, choice, chat_shape)
    results = await s.complete(http, request, [prompt])
    choices = []
    for i, result in enumerate(results):
        text, reason = s.text_of(result, request.stops())
        chances = None
        if request.logprobs:
            chances = for_answer(chat_shape, s.tokenizer, result.tokens, result.logprobs, text)
        message = {"role": "assistant", "content": text}
        choices.append({"index": i, "message": message, "finish_reason": reason, "logprobs": chances})
    return _envelope("chatcmpl", "chat.completion", request, choices, results)


def _envelope(
    prefix: str,
    kind: str,
    request: CompletionRequest | ChatRequest,
    choices: list[dict],
    results: list[Completion],
) -> dict:
    """OpenAI's answer around the choices: a fresh id, the object kind, the time, the model, the usage."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": usage(dict(enumerate(results)), request.n),
    }


@protected.get("/tokenizer_info")
async def tokenizer_info(s: Served) -> dict:
    """The tokenizer's special tokens and chat template (vLLM's endpoint), for clients that tokenize on the
    server instead of loading the tokenizer themselves."""
    tokenizer = s.tokenizer
    return {
        "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
        "chat_template": getattr(tokenizer, "chat_template", None), "vocab_size": s.vocabulary,
        "max_model_len": s.limits.max_prompt_tokens,
    }  # fmt: skip


@protected.post("/tokenize")
async def tokenize(request: TokenizeRequest, s: Served) -> dict:
    """The ids /v1/completions (prompt) or /v1/chat/completions (messages) would run: typed special tokens'
    text stays text; `add_special_tokens` adds the tokenizer's own (a BOS, say) around a prompt."""
    if request.messages is not None:
        ids = await s.chat_prompt(ChatRequest(model=s.base_name, messages=request.messages))
    else:
        s.check_length(len(request.prompt))
        ids = await asyncio.to_thread(s.prompts.text_ids, request.prompt, request.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": s.limits.max_prompt_tokens}


@protected.post("/detokenize")
async def detokenize(request: DetokenizeRequest, s: Served) -> dict:
    s.check_token_ids(request.tokens)
    return {"prompt": s.tokenizer.decode(request.tokens, skip_special_tokens=False)}


@protected.post("/v1/adapters")
async def load(request: AdapterLoadRequest, s: Served) -> dict:
    try:
        entry = await asyncio.wrap_future(s.engine.call(lambda: s.cache.load(request.name)))
    except Exception as exc:
        raise s.public(exc) from exc
    return {"name": entry.name, "bytes": entry.bytes, "peft_type": entry.peft_type, "loaded": True}


@protected.delete("/v1/adapters/{name}")
async def unload(name: str, s: Served) -> dict:
    """Unload now, or, while rows use the adapter, once they end: new rows for it wait meanwhile (and load it
    again afterwards), so a busy adapter cannot be kept loaded by its traffic."""
    try:
        drained = await asyncio.wrap_future(s.engine.call(lambda: s.cache.unload_when_idle(name)))
        await asyncio.wait_for(asyncio.wrap_future(drained), s.limits.request_timeout_s)
    except Exception as exc:
        raise s.public(exc) from exc
    return {"name": name, "loaded": False}
