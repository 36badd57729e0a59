"""Errors in OpenAI's JSON shape ({"error": {"message", "type", "code"}}): which exception means which status,
adapter-folder paths kept out of messages, and two ASGI middlewares (a body-size limit before parsing, and a
catch-all that turns an escaped exception into a logged 500 for that request only)."""

from __future__ import annotations

import logging
from contextlib import suppress
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import AdapterNotFoundError, DeltatuneError
from ..runtime import AdapterNameInvalid, CacheFullError
from ..runtime.cache import AdapterDraining
from .work import EngineStopped, RequestTimeout, ServerBusy

log = logging.getLogger("deltatune.serve")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


RETRY_AFTER_S = 2  # what a 503 tells a client to wait: the queue or the cache turns over in about that long


def error_response(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status, headers=headers)


def status_of(exc: BaseException) -> ApiError:
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
    _log_once(exc)
    return ApiError(
        500, f"internal error ({type(exc).__name__}); the server logs have details", "server_error"
    )


_logged: set[str] = set()


def _log_once(exc: BaseException) -> None:
    """An unexpected error's traceback, once per kind of error (a broken adapter fails every request that uses
    it: its traceback need not fill the log); each later one is a line."""
    kind = f"{type(exc).__name__}: {str(exc)[:200]}"
    if kind in _logged:
        log.error("request failed: %s (traceback logged before)", kind)
        return
    if len(_logged) < 1000:
        _logged.add(kind)
    log.error("request failed: %s", kind, exc_info=exc)


class PathsHidden:
    """Turns `status_of` messages into ones that name adapter folders relative to the adapters folder."""

    def __init__(self, *folders: Path | None) -> None:
        paths = {str(f) for f in folders if f is not None} | {str(f.resolve()) for f in folders if f}
        self.paths = sorted(paths, key=len, reverse=True)  # the longest first: no half-replaced path

    def __call__(self, exc: BaseException) -> ApiError:
        err = status_of(exc)
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
            err = status_of(exc)  # logs it
            await error_response(err.status, err.message, err.kind, err.code)(scope, receive, send)


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
        seen, exceeded, started = 0, False, False

        async def counted() -> dict:
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                exceeded = True
                raise _TooLarge
            return message

        async def unless_exceeded(message: dict) -> None:
            # the framework answers a body it could not finish reading with its own 400 ("error parsing
            # the body"); past the limit, that answer is dropped for the 413 below
            nonlocal started
            if not exceeded:
                started = started or message["type"] == "http.response.start"
                await send(message)

        with suppress(_TooLarge):
            await self.app(scope, counted, unless_exceeded)
        if exceeded and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(
            413, f"request body over the limit of {self.limit} bytes", "invalid_request_error"
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def install_error_handlers(app: FastAPI, public: PathsHidden) -> None:
    """Answer ApiError and request-validation failures as JSON errors (400 for what the client sent)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        err = public(exc)
        return error_response(err.status, err.message, err.kind, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own errors (unknown route, wrong method, a body it cannot read) in OpenAI's shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {request.method} {request.url.path}"}.get(exc.status_code, str(exc.detail))
        cause = exc.__cause__  # the framework's "error parsing the body" hides why
        if isinstance(cause, UnicodeDecodeError):
            message = f"the request body is not valid UTF-8 (byte {cause.start}); send UTF-8 JSON"
        elif isinstance(cause, RecursionError):
            message = "the request body's JSON is nested too deeply"
        response = error_response(exc.status_code, message, kind)
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(
                400, "the request body is not valid JSON", "invalid_request_error", "json_invalid"
            )
        described = "; ".join(
            f"{'.'.join(str(x) for x in p.get('loc', ())[1:]) or 'body'}: {p.get('msg')}"
            for p in problems[:5]
        )
        return error_response(400, f"invalid request: {described}", "invalid_request_error", "invalid_fields")
