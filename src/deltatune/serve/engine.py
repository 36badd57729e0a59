"""The serving engine: one thread owns the model and runs everything that touches it.

HTTP handlers only queue work. The engine thread takes what has arrived, waits `batch_window_s` for more (up
to `max_batch` rows), groups rows by sampling settings and runs each group as one batched `generate`, rows of
different adapters together (mixed LoRA batches). Loading and unloading adapters go through the same queue,
so the model never changes under a running forward. A failing group is retried row by row, so one bad
request fails alone and the thread carries on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..runtime import AdapterCache, Completion, generate
from .stops import reaches_stop


@dataclass
class Row:
    """One prompt to continue: token ids, the adapter folder name (None: base) and its sampling settings."""

    prompt: list[int]
    adapter: str | None
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    on_token: Callable[[int], None] | None = None  # streaming: called on the engine thread per new token
    stops: list[str] = field(default_factory=list)  # the row ends with the token that completes one of these
    future: Future = field(default_factory=Future)
    streamed: int = 0  # tokens handed to on_token so far; a row that streamed some cannot be rerun
    cancelled: bool = False  # set from any thread (its client went away): the row ends at its next token
    stop_reached: bool = False  # ended at a stop string (its finish_reason is then "stop")

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)


@dataclass
class Call:
    """Other work that must run on the engine thread (adapter load / unload)."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


@dataclass
class Stats:
    rows: int = 0
    batches: int = 0
    largest_batch: int = 0
    most_adapters_in_batch: int = 0
    failed_rows: int = 0
    cancelled_rows: int = 0
    rows_ended_at_stop_string: int = 0


class ServerBusy(RuntimeError):
    """The queue is full; the client should retry later."""


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cache: AdapterCache,
        *,
        max_batch: int = 16,
        batch_window_s: float = 0.01,
        max_queue: int = 256,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.stats = Stats()
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos_token_id = tokenizer.eos_token_id
        self._queue: queue.Queue[Row | Call | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
        self._thread.start()

    # ---- submitting (any thread) ---------------------------------------------------------------------------
    def submit(self, item: Row | Call) -> Future:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise ServerBusy("the request queue is full; retry shortly") from None
        return item.future

    def call(self, fn: Callable[[], Any]) -> Future:
        return self.submit(Call(fn))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, Call):
                self._run_call(item)
                continue
            rows = [item]
            deadline = time.monotonic() + self.batch_window_s
            calls = []
            while len(rows) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                (calls if isinstance(nxt, Call) else rows).append(nxt)
            self._run_rows(rows)
            for call in calls:
                self._run_call(call)

    def _run_call(self, call: Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:  # reported to the caller; the engine carries on
            call.future.set_exception(exc)

    def _run_rows(self, rows: list[Row]) -> None:
        rows = [r for r in rows if r.future.set_running_or_notify_cancel()]
        groups: dict[tuple[float, float], list[Row]] = {}
        for row in rows:
            groups.setdefault(row.sampling, []).append(row)
        for group in groups.values():
            try:
                results = self._generate(group)
            except Exception as exc:
                if len(group) == 1:
                    self.stats.failed_rows += 1
                    group[0].future.set_exception(exc)
                    continue
                for row in group:  # find the row that fails; the others still get their answer
                    if row.streamed:  # its client has part of an answer already: a rerun would repeat it
                        self.stats.failed_rows += 1
                        row.future.set_exception(exc)
                    else:
                        self._run_row_alone(row)
                continue
            for row, result in zip(group, results, strict=True):
                row.future.set_result(result)

    def _run_row_alone(self, row: Row) -> None:
        try:
            (result,) = self._generate([row])
        except Exception as exc:
            self.stats.failed_rows += 1
            row.future.set_exception(exc)
        else:
            row.future.set_result(result)

    def _generate(self, rows: list[Row]) -> list[Completion]:
        with self.cache.pinned(r.adapter for r in rows) as keys:
            temperature, top_p = rows[0].sampling
            results = generate(
                self.model,
                [r.prompt for r in rows],
                [keys[r.adapter] if r.adapter is not None else None for r in rows],
                max_new_tokens=[r.max_new_tokens for r in rows],
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
                temperature=temperature,
                top_p=top_p,
                on_token=_streaming(rows),
                stop_rows=self._row_ends(rows),
            )
        for row, result in zip(rows, results, strict=True):
            if row.stop_reached:  # its tokens run up to the one that completed the stop string
                result.finish_reason = "stop"
                self.stats.rows_ended_at_stop_string += 1
            elif result.finish_reason == "cancelled":
                self.stats.cancelled_rows += 1
        self.stats.rows += len(rows)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        self.stats.most_adapters_in_batch = max(self.stats.most_adapters_in_batch, len(keys))
        return results

    def _row_ends(self, rows: list[Row]) -> Callable[[int, list[int]], bool] | None:
        """When a row of this batch ends early: its client went away or its text reached a stop string.
        None (no check per token) when no row streams or has stop strings."""
        for row in rows:
            row.stop_reached = False  # a row rerun alone after its batch failed starts over
        if not any(r.on_token or r.stops for r in rows):
            return None

        def ends(index: int, new_tokens: list[int]) -> bool:
            row = rows[index]
            if row.stops and not row.stop_reached:
                row.stop_reached = reaches_stop(self.tokenizer, new_tokens, row.stops)
            return row.cancelled or row.stop_reached

        return ends


def _streaming(rows: list[Row]) -> Callable[[int, int], None] | None:
    """The generate callback passing each streaming row its tokens; a callback that fails (the client went
    away) is dropped, and the row still completes."""
    if not any(r.on_token for r in rows):
        return None

    def on_token(index: int, token: int) -> None:
        row = rows[index]
        if row.on_token is None:
            return
        try:
            row.on_token(token)
        except Exception:
            row.on_token = None
            return
        row.streamed += 1

    return on_token
