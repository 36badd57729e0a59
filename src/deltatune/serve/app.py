"""FastAPI app: OpenAI-style completions over the engine, adapter load/unload, health.

Every error is JSON in OpenAI's shape ({"error": {"message", "type", "code"}}) with a 4xx status for what the
client can fix: malformed JSON or fields (400), missing or wrong API key (401), unknown adapter (404), an
adapter that cannot be used or is being unloaded (409), body too large (413), a full queue or cache or a
stopped engine (503), a request past its deadline (504). Anything unexpected is a 500 for that request only,
logged with its traceback, and the connection stays usable. With stream=true the same checks run before the
stream starts; an error after that is a final error event. Error messages never show the adapters folder's
path on this machine. `/health` answers anyone with liveness alone; `/health/details` needs the key.

The pieces: `errors.py` (statuses, middlewares), `service.py` (what a request does), `routes.py` (endpoints).
"""

from __future__ import annotations

from fastapi import FastAPI

from .engine import Engine
from .errors import BodyLimit, CatchAll, install_error_handlers
from .routes import protected, public
from .service import Limits, Service


def create_app(
    engine: Engine, *, base_name: str, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    limits = limits or Limits()
    # no redirect to the path with or without a trailing slash: a client that sent it gets a JSON 404
    app = FastAPI(title="deltatune", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    app.add_middleware(CatchAll)
    app.state.service = service = Service(engine, base_name=base_name, api_key=api_key, limits=limits)
    install_error_handlers(app, service.public)
    app.include_router(public)
    app.include_router(protected)
    return app


__all__ = ["Limits", "create_app"]
