"""Shutting down on SIGTERM without leaving a client with a half answer."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import uvicorn

from .engine import Engine


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM's grace period (`timeout_graceful_shutdown`) split in two: requests may finish in
    the first half; then the engine stops, and every request still open gets an OpenAI-shaped error (503
    with Retry-After; a stream, its error event and [DONE]) before uvicorn would cancel it, which answers a
    plain-text 500 or cuts a stream short."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float) -> None:
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s

    async def shutdown(self, sockets: Any = None) -> None:
        stop = threading.Thread(target=self.engine.close, name="deltatune-drain", daemon=True)
        asyncio.get_running_loop().call_later(self.grace_s / 2, stop.start)
        await super().shutdown(sockets)
