"""FastAPI app: OpenAI-style completions over the engine, adapter load/unload, health.

Every error is JSON in OpenAI's shape ({"error": {"message", "type", "code"}}) with a 4xx status for what the
client can fix: malformed JSON or fields (400), missing or wrong API key (401), unknown adapter (404), an
adapter that cannot be used or is being unloaded (409), body too large (413), a full queue or cache or a
stopped engine (503), a request past its deadline (504). Anything unexpected is a 500 for that request only,
logged with its traceback, and the connection stays usable. With stream=true the same checks run before the
stream starts; an error after that is a final error event. Error messages never show the adapters folder's
path on this machine. `/health` answers anyone with liveness alone; `/health/details` needs the key.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..core.errors import AdapterNotFoundError, DeltatuneError
from ..runtime import AdapterNameInvalid, CacheFullError, Completion
from ..runtime.cache import AdapterDraining
from .engine import Engine, EngineStopped, RequestTimeout, Row, ServerBusy
from .prompts import encode_chat, encode_text
from .schemas import AdapterLoadRequest, ChatRequest, CompletionRequest
from .stops import first_stop
from .streaming import TextDeltas, TokenFeed, event

log = logging.getLogger("deltatune.serve")


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_request_bytes: int = 1 << 20
    max_prompts_per_request: int = 16
    # OpenAI allows 4 stop sequences; long or many ones would make every token's stop check costly
    max_stops: int = 4
    max_stop_chars: int = 256
    # text longer than this is refused before tokenizing (None: 32 characters per allowed prompt token)
    max_prompt_chars: int | None = None
    # a request not answered by then fails with 504 and its rows leave the batch
    request_timeout_s: float = 300.0
    # how often a non-streamed request checks whether its client is still connected
    disconnect_poll_s: float = 0.5

    @property
    def prompt_chars(self) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * self.max_prompt_tokens


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
    if isinstance(exc, (ServerBusy, CacheFullError, EngineStopped)):
        return ApiError(503, str(exc), "server_busy")
    if isinstance(exc, AdapterDraining):
        return ApiError(409, str(exc), code="adapter_draining")
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc), "timeout", "request_timeout")
    if isinstance(exc, DeltatuneError):
        return ApiError(409, f"the adapter cannot be used: {exc}", code="adapter_unusable")
    log.error("request failed: %s", type(exc).__name__, exc_info=exc)
    return ApiError(
        500, f"internal error ({type(exc).__name__}); the server logs have details", "server_error"
    )


class PathsHidden:
    """Turns `_status_of` messages into ones that name adapter folders relative to the adapters folder."""

    def __init__(self, *folders: Path | None) -> None:
        paths = {str(f) for f in folders if f is not None} | {str(f.resolve()) for f in folders if f}
        self.paths = sorted(paths, key=len, reverse=True)  # the longest first: no half-replaced path

    def __call__(self, exc: BaseException) -> ApiError:
        err = _status_of(exc)
        message = err.message
        for path in self.paths:
            message = message.replace(path + "/", "").replace(path, "the adapters folder")
        return ApiError(err.status, message, err.kind, err.code)


class CatchAll:
    """ASGI middleware: an exception no handler took becomes a logged 500 JSON answer here, instead of
    propagating to the server, which would answer 500 too but also drop the client's connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:  # too late for a status: the client sees the body end early
                log.error("response failed after it started", exc_info=exc)
                return
            err = _status_of(exc)  # logs it
            await _error(err.status, err.message, err.kind, err.code)(scope, receive, send)


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
    app.add_middleware(CatchAll)
    started = time.time()
    tokenizer, cache = engine.tokenizer, engine.cache
    public = PathsHidden(cache.directory)
    vocabulary = len(tokenizer)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        err = public(exc)
        return _error(err.status, err.message, err.kind, err.code)

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

    def check_text(request: CompletionRequest | ChatRequest, prompts: int, texts: list[str]) -> None:
        """Limits that hold before any tokenizing: the number of prompts, the size of their text, stop
        strings."""
        if prompts > limits.max_prompts_per_request:
            raise ApiError(
                400, f"{prompts} prompts in one request; the limit is {limits.max_prompts_per_request}"
            )
        size = sum(len(t) for t in texts)
        if size > limits.prompt_chars:
            raise ApiError(
                400,
                f"the prompt text has {size} characters; the limit is {limits.prompt_chars}",
                code="prompt_too_long",
            )
        stops = request.stops()
        if len(stops) > limits.max_stops:
            raise ApiError(400, f"{len(stops)} stop strings; the limit is {limits.max_stops}", code="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > limits.max_stop_chars:
            raise ApiError(
                400,
                f"a stop string has {longest} characters; the limit is {limits.max_stop_chars}",
                code="stop",
            )

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
        for ids in prompts:
            if not ids:
                raise ApiError(400, "a prompt encodes to no tokens; send some text")
            if len(ids) > limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"a prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}",
                    code="prompt_too_long",
                )
            if max(ids) >= vocabulary:
                raise ApiError(
                    400,
                    f"token id {max(ids)} is outside the vocabulary (0 to {vocabulary - 1})",
                    code="token_id",
                )
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            return [
                Row(
                    ids,
                    adapter,
                    max_tokens,
                    request.temperature,
                    request.top_p,
                    stops=request.stops(),
                    deadline=deadline,
                )
                for ids in prompts
            ]
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def submit_all(rows: list[Row]) -> list:
        futures = []
        try:
            for row in rows:
                futures.append(engine.submit(row))
        except Exception as exc:
            for row in rows:  # the part of the request that was queued is not needed any more
                row.cancelled = True
            raise public(exc) from exc
        return futures

    async def complete(
        http: Request, request: CompletionRequest | ChatRequest, prompts: list[list[int]]
    ) -> list[Completion]:
        """Wait for the rows' answers; a client that disconnects meanwhile ends its rows at their next token."""
        rows = checked(request, prompts)
        waiting = {asyncio.wrap_future(f) for f in submit_all(rows)}
        pending = set(waiting)
        give_up = time.monotonic() + limits.request_timeout_s + 30  # the engine's own deadline comes first
        try:
            while pending:
                _, pending = await asyncio.wait(pending, timeout=limits.disconnect_poll_s)
                if pending and await http.is_disconnected():
                    raise ApiError(499, "the client disconnected", code="client_closed")
                if pending and time.monotonic() > give_up:
                    raise ApiError(504, "the request passed its deadline", "timeout", "request_timeout")
            try:
                return [r.future.result() for r in rows]
            except Exception as exc:
                raise public(exc) from exc
        finally:
            for row in rows:
                row.cancelled = True  # a no-op for rows already answered

    def stream(
        request: CompletionRequest | ChatRequest, prompts: list[list[int]], chunk: Callable[..., dict]
    ) -> StreamingResponse:
        """Server-sent events: `chunk(index, text, finish_reason)` per piece of text, then [DONE]. Limits
        and a full queue are refused before the stream starts; a row failing later ends with an error event."""
        rows = checked(request, prompts)
        feed = TokenFeed(asyncio.get_running_loop())
        for i, row in enumerate(rows):
            row.on_token = feed.on_token(i)
        futures = submit_all(rows)
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
                        err = public(exc)
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
    async def health() -> JSONResponse:
        """Liveness for anyone (load balancers): 200 while the engine runs, else 503."""
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, 503)

    @app.get("/health/details", dependencies=[Depends(authorize)])
    async def health_details() -> dict:
        return {
            "status": "ok" if engine.alive else "engine stopped",
            "engine_failure": None if engine.failure is None else type(engine.failure).__name__,
            "uptime_s": round(time.time() - started, 1),
            "loaded_adapters": [e.name for e in cache.loaded],
            "cache_bytes": cache.bytes_used,
            "free_slot_bytes": cache.free_slot_bytes,
            "decode_stack_bytes": engine.decoding.stack_bytes,
            "stats": asdict(engine.stats),
        }

    @app.get("/v1/openapi.json", dependencies=[Depends(authorize)], include_in_schema=False)
    async def openapi() -> dict:
        """The API's schema, for clients and the fuzzer (behind the key, like everything but liveness)."""
        return app.openapi()

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

    async def encoded(request: CompletionRequest) -> list[list[int]]:
        items = request.prompt_items()
        texts = [t for t in items if isinstance(t, str)]
        check_text(request, len(items), texts)
        if not texts:
            return items
        # off the event loop: a long text takes a while, and /health must keep answering meanwhile
        done = iter(await asyncio.to_thread(lambda: [encode_text(tokenizer, t) for t in texts]))
        return [next(done) if isinstance(t, str) else t for t in items]

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(http: Request, request: CompletionRequest) -> Any:
        prompts = await encoded(request)
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
        results = await complete(http, request, prompts)
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
    async def chat(http: Request, request: ChatRequest) -> Any:
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the base model's tokenizer has no chat template; use /v1/completions")
        messages = [m.model_dump() for m in request.messages]
        check_text(request, 1, [m["content"] for m in messages])
        try:
            prompt = await asyncio.to_thread(encode_chat, tokenizer, messages)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
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
        (result,) = await complete(http, request, [prompt])
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
            raise public(exc) from exc
        return {"name": entry.name, "bytes": entry.bytes, "peft_type": entry.peft_type, "loaded": True}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(authorize)])
    async def unload(name: str) -> dict:
        """Unload now, or, while rows use the adapter, once they end: new rows for it wait meanwhile (and
        load it again afterwards), so a busy adapter cannot be kept loaded by its traffic."""
        try:
            drained = await asyncio.wrap_future(engine.call(lambda: cache.unload_when_idle(name)))
            await asyncio.wait_for(asyncio.wrap_future(drained), limits.request_timeout_s)
        except Exception as exc:
            raise public(exc) from exc
        return {"name": name, "loaded": False}

    return app
