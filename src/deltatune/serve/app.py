"""FastAPI app: OpenAI-style completions over the engine, adapter load/unload, health.

Every error is JSON in OpenAI's shape ({"error": {"message", "type", "code"}}) with a 4xx status for what the
client can fix: malformed JSON or fields (400), missing or wrong API key (401), unknown adapter (404), body
too large (413), a full queue or cache (503). Anything unexpected is a 500 for that request only.
With stream=true the same checks run before the stream starts; an error after that is a final error event.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..core.errors import AdapterNotFoundError, DeltatuneError
from ..runtime import AdapterNameInvalid, CacheFullError, Completion
from .engine import Engine, Row, ServerBusy
from .schemas import AdapterLoadRequest, ChatRequest, CompletionRequest
from .stops import first_stop
from .streaming import TextDeltas, TokenFeed, event


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_request_bytes: int = 1 << 20
    max_prompts_per_request: int = 16


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def _status_of(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AdapterNameInvalid):
        return ApiError(400, str(exc), code="invalid_adapter_name")
    if isinstance(exc, AdapterNotFoundError):
        return ApiError(404, str(exc), code="model_not_found")
    if isinstance(exc, (ServerBusy, CacheFullError)):
        return ApiError(503, str(exc), "server_busy")
    if isinstance(exc, DeltatuneError):
        return ApiError(409, f"the adapter cannot be used: {exc}", code="adapter_unusable")
    return ApiError(
        500, f"internal error ({type(exc).__name__}); the server logs have details", "server_error"
    )


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes, declared or streamed, before parsing."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = _error(413, f"request body over the limit of {self.limit} bytes", "invalid_request_error")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(
    engine: Engine, *, base_name: str, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="deltatune", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    started = time.time()
    tokenizer, cache = engine.tokenizer, engine.cache

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "the request body is not valid JSON", "invalid_request_error", "json_invalid")
        described = "; ".join(
            f"{'.'.join(str(x) for x in p.get('loc', ())[1:]) or 'body'}: {p.get('msg')}"
            for p in problems[:5]
        )
        return _error(400, f"invalid request: {described}", "invalid_request_error", "invalid_fields")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = _status_of(exc)
        return _error(err.status, err.message, err.kind, err.code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"
            )

    def adapter_for(model: str) -> str | None:
        if model == base_name:
            return None
        try:
            cache.resolve(model)
        except (AdapterNameInvalid, AdapterNotFoundError) as exc:
            raise ApiError(
                404,
                f"model {model!r} not found: {exc}. GET /v1/models lists what is served",
                code="model_not_found",
            ) from None
        return model

    def checked(request: CompletionRequest | ChatRequest, prompts: list[list[int]]) -> list[Row]:
        """The engine rows for a request, after every limit is checked."""
        adapter = adapter_for(request.model)
        max_tokens = request.max_tokens if request.max_tokens is not None else min(16, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                code="max_tokens",
            )
        if len(prompts) > limits.max_prompts_per_request:
            raise ApiError(
                400, f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request}"
            )
        for ids in prompts:
            if not ids:
                raise ApiError(400, "a prompt encodes to no tokens; send some text")
            if len(ids) > limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"a prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}",
                    code="prompt_too_long",
                )
        return [
            Row(ids, adapter, max_tokens, request.temperature, request.top_p, stops=request.stops())
            for ids in prompts
        ]

    async def complete(
        request: CompletionRequest | ChatRequest, prompts: list[list[int]]
    ) -> list[Completion]:
        futures = [engine.submit(row) for row in checked(request, prompts)]
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except Exception as exc:
            raise _status_of(exc) from exc

    def stream(
        request: CompletionRequest | ChatRequest, prompts: list[list[int]], chunk: Callable[..., dict]
    ) -> StreamingResponse:
        """Server-sent events: `chunk(index, text, finish_reason)` per piece of text, then [DONE]. Limits
        and a full queue are refused before the stream starts; a row failing later ends with an error event."""
        rows = checked(request, prompts)
        feed = TokenFeed(asyncio.get_running_loop())
        for i, row in enumerate(rows):
            row.on_token = feed.on_token(i)
        try:
            futures = [engine.submit(row) for row in rows]
        except Exception as exc:
            raise _status_of(exc) from exc
        for i, future in enumerate(futures):
            feed.watch(i, future)
        stops = request.stops()

        async def events() -> AsyncIterator[str]:
            deltas = [TextDeltas(tokenizer, stops) for _ in rows]
            try:
                async for i, token in feed.items(len(rows)):
                    if token is not None:
                        piece = deltas[i].add(token)  # the engine ends the row at a stop string
                        if piece:
                            yield event(chunk(i, piece, None))
                        continue
                    try:
                        result = futures[i].result()
                    except Exception as exc:
                        err = _status_of(exc)
                        yield event({"error": {"message": err.message, "type": err.kind, "code": err.code}})
                        continue
                    text, reason = text_of(result, stops)
                    piece = deltas[i].rest(text)
                    if piece:
                        yield event(chunk(i, piece, None))
                    yield event(chunk(i, "", reason))
                yield event("[DONE]")
            finally:  # also when the client went away mid-stream: its rows stop at their next token
                for row in rows:
                    row.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream")

    def text_of(result: Completion, stops: list[str]) -> tuple[str, str]:
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        cut = first_stop(text, stops)
        if cut is not None:
            return text[:cut], "stop"
        return text, result.finish_reason

    def usage(results: list[Completion]) -> dict[str, int]:
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(len(r.tokens) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "uptime_s": round(time.time() - started, 1),
            "loaded_adapters": [e.name for e in cache.loaded],
            "cache_bytes": cache.bytes_used,
            "free_slot_bytes": cache.free_slot_bytes,
            "decode_stack_bytes": engine.decoding.stack_bytes,
            "stats": asdict(engine.stats),
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        loaded = {e.name for e in cache.loaded}
        data = [{"id": base_name, "object": "model", "owned_by": "deltatune", "adapter": False}]
        data += [
            {
                "id": name,
                "object": "model",
                "owned_by": "deltatune",
                "adapter": True,
                "loaded": name in loaded,
            }
            for name in cache.available()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: CompletionRequest) -> Any:
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if request.stream:
            name, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

            def chunk(index: int, text: str, reason: str | None) -> dict:
                choice = {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
                return {
                    "id": name,
                    "object": "text_completion",
                    "created": created,
                    "model": request.model,
                    "choices": [choice],
                }

            return stream(request, prompts, chunk)
        results = await complete(request, prompts)
        choices = []
        for i, result in enumerate(results):
            text, reason = text_of(result, request.stops())
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": choices,
            "usage": usage(results),
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: ChatRequest) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the base model's tokenizer has no chat template; use /v1/completions")
        messages = [m.model_dump() for m in request.messages]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if request.stream:
            name, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            first = [True]

            def chunk(index: int, text: str, reason: str | None) -> dict:
                delta = {"content": text} if text else {}
                if first[0]:  # OpenAI's first delta names the role
                    delta, first[0] = {"role": "assistant", **delta}, False
                return {
                    "id": name,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": request.model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": reason}],
                }

            return stream(request, [prompt], chunk)
        (result,) = await complete(request, [prompt])
        text, reason = text_of(result, request.stops())
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            ],
            "usage": usage([result]),
        }

    @app.post("/v1/adapters", dependencies=[Depends(authorize)])
    async def load(request: AdapterLoadRequest) -> dict:
        try:
            entry = await asyncio.wrap_future(engine.call(lambda: cache.load(request.name)))
        except Exception as exc:
            raise _status_of(exc) from exc
        return {"name": entry.name, "bytes": entry.bytes, "peft_type": entry.peft_type, "loaded": True}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(authorize)])
    async def unload(name: str) -> dict:
        try:
            await asyncio.wrap_future(engine.call(lambda: cache.unload(name)))
        except Exception as exc:
            raise _status_of(exc) from exc
        return {"name": name, "loaded": False}

    return app
