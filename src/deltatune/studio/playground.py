"""The studio's playground: chat with a base model and up to three run adapters side by side, streamed.

One base model at a time lives in the studio's process, and the adapters of the runs trained on it load into
that one model (the runtime's AdapterCache). Chats go through `deltatune serve`'s own app and engine, mounted
under /playground/api, so a chat here obeys the same queue bound, deadline and cancellation as a served one;
an adapter's name there is its run's name. Training never shares this process: it runs in its own."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import AdapterNotFoundError
from ..runtime import AdapterCache, AdapterNameInvalid
from .runs import NoAdapter, OutsideRoot, Run, adapter_folder, find_runs

MAX_ADAPTERS = 3  # columns beside the base's
CACHE_BYTES = 1 << 30  # adapters kept loaded; the least recently used go beyond it


class RunAdapters(AdapterCache):
    """The adapters of the runs under the studio's root, named by their run ("group/run" ->
    group/run/adapter), with the same refusal of names and links that lead outside it."""

    def resolve(self, name: str) -> Path:
        try:  # the directory is always the studio's root
            folder = adapter_folder(self.directory, name)
        except OutsideRoot as exc:
            raise AdapterNameInvalid(str(exc)) from None
        except NoAdapter as exc:
            raise AdapterNotFoundError(str(exc)) from None
        return self.contained(name, folder)

    def available(self) -> list[str]:
        return [run.name for run in find_runs(self.directory) if run.has_adapter] if self.directory else []


def chat_runs(root: Path) -> list[Run]:
    """The runs whose adapter can chat: a causal LM's, kept at least once."""
    return [r for r in find_runs(root) if r.has_adapter and r.task == "causal_lm" and r.base]


class Playground:
    """The base model the playground chats with, loaded on request on a thread of its own (a page keeps
    answering meanwhile), and the serve app in front of it. `state`: empty | loading | ready | failed."""

    def __init__(self, root: Path, build: Callable[[Path, str], tuple[Any, Any]] | None = None) -> None:
        self.root = root
        self._build = build or build_chat_app
        self._lock = threading.Lock()
        self.state, self.base, self.error = "empty", None, None
        self.app: Any = None
        self._engine: Any = None

    def describe(self) -> dict[str, Any]:
        return {"state": self.state, "base": self.base, "error": self.error}

    def load(self, base: str) -> None:
        """Start loading `base` (the one loaded, or loading, already: nothing to do). The model it replaces
        goes once the new one is ready; its open chats end with an error event."""
        base = base.strip()
        if not base:
            raise ValueError("name a base model: a folder, a bundled name (smollm2) or a hub id")
        with self._lock:
            if self.base == base and self.state in ("loading", "ready"):
                return
            self.state, self.base, self.error = "loading", base, None
        threading.Thread(target=self._load, args=(base,), name="playground-load", daemon=True).start()

    def _load(self, base: str) -> None:
        try:
            app, engine = self._build(self.root, base)
        except Exception as exc:  # a page shows why, and another base can be picked
            with self._lock:
                if self.base == base:
                    self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            if self.base != base:  # another base was asked for meanwhile
                old = engine
            else:
                old, self.app, self._engine, self.state = self._engine, app, engine, "ready"
        if old is not None:
            old.close()

    def close(self) -> None:
        with self._lock:
            engine, self._engine, self.app, self.state = self._engine, None, None, "empty"
        if engine is not None:
            engine.close()

    async def __call__(self, scope, receive, send) -> None:
        """ASGI: the serve app while a base is ready, else an OpenAI-shaped 503 that says why."""
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        waiting = "is still loading" if self.state == "loading" else "is not loaded"
        message = f"the playground's base model {waiting}: pick one on the playground page"
        body = json.dumps({"error": {"message": message, "type": "server_error", "code": "no_base"}})
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body.encode()})


def build_chat_app(root: Path, base: str) -> tuple[Any, Any]:
    """The serve app and engine over `base`, with the runs' adapters loadable by run name."""
    from ..serve import Engine, create_app, load_base

    model, tokenizer = load_base(base)
    cache = RunAdapters(model, root, budget_bytes=CACHE_BYTES, tokenizer=tokenizer, reload_changed=True)
    engine = Engine(model, tokenizer, cache)
    return create_app(engine, base_name=base), engine
