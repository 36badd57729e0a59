"""The serving engine: one thread owns the model and runs everything that touches it.

HTTP handlers only queue work. Rows are decoded by continuous batching (`runtime.decode.DecodeBatch`): before
every decode step the engine takes what has arrived, prefills the new rows and merges them into the running
batch (up to `max_batch` live rows, any mix of adapters and sampling settings), and a row leaves the batch as
soon as it ends, so a request never waits for another's whole generation. When the batch is empty the first
arrival waits `batch_window_s` for company. Rows the decode loop cannot take (adapters that are not plain
LoRA, a model whose KV cache it cannot merge) run as fixed batches through `runtime.generate`, grouped by
sampling settings. Loading and unloading adapters run between steps, ahead of queued rows, so the model
never changes under a running forward and an operator is not kept waiting behind traffic. An adapter being
unloaded while rows use it drains: rows arriving for it wait until it is gone, then load it afresh.

No request may stop the engine: sampling settings are checked before a row is admitted; a row whose scores
turn non-finite leaves the batch with its own error; a failing prefill or step is retried row by row, so one
bad request fails alone; anything unexpected fails the rows it touched and the loop carries on. Every row has
a deadline. Should the thread ever end, `failure` says why, `alive` is False and new work is refused.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack, suppress
from typing import Any

from torch import nn

from ..runtime import AdapterCache, CacheFullError, Completion
from ..runtime.cache import AdapterDraining
from ..runtime.decode import ContinuousBatchingUnsupported, DecodeBatch, Step
from ..runtime.mixed import mixable_refusal
from ..runtime.prefix_cache import DEFAULT_BUDGET_BYTES, PrefixCache
from ..runtime.prompt_pass import PromptPass
from .fixed_batches import FixedBatches
from .prompt_work import PromptRounds, PromptWork
from .stops import StopWatch
from .work import (
    Call,
    EngineStopped,
    Live,
    RequestCancelled,
    RequestTimeout,
    Row,
    Score,
    ServerBusy,
    Stats,
    stream_token,
)

log = logging.getLogger("deltatune.serve")


_WAKE_UP = object()  # put on the row queue so an idle engine turns to a newly submitted Call


class Engine(PromptRounds, FixedBatches):
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cache: AdapterCache,
        *,
        max_batch: int = 16,
        batch_window_s: float = 0.01,
        max_queue: int = 256,
        continuous: bool = True,
        prompt_tokens_per_round: int = 512,
        prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES,
    ) -> None:
        """`prompt_tokens_per_round`: the most prompt tokens (prefill and scoring) run between two decode
        steps; longer prompts run in chunks (`prompt_work.PromptWork`). `prefix_cache_bytes`: memory for the
        KV of earlier prompts, reused by requests that open alike (`runtime.prefix_cache`; 0: none)."""
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
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        if self.prefixes is not None:  # an adapter's KV goes with its weights
            cache.on_release.append(self.prefixes.forget)
        self.decoding = DecodeBatch(
            self.model,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            capacity=max_batch,
            prefixes=self.prefixes,
        )
        # False: fixed batches only (asked for, or the model keeps a KV cache the decode loop cannot merge)
        self.continuous = continuous
        self._live: dict[int, Live] = {}  # decode-batch handle -> row
        self._waiting: deque[Row | Score] = deque()  # taken from the queue, not yet in the batch
        self.prompts = PromptWork(prompt_tokens_per_round)  # long prompts running in chunks
        self._queue: queue.Queue[Row | Score | None] = queue.Queue(maxsize=max_queue)
        self._calls: queue.SimpleQueue[Call] = queue.SimpleQueue()  # run before queued rows
        self._closing = threading.Event()
        self.failure: BaseException | None = None  # why the thread ended, if not by close()
        self._thread = threading.Thread(target=self._run, name="deltatune-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Rows and prompts submitted and not answered yet (queued, waiting, running in chunks or decoding);
        read from another thread, so a moment's count."""
        return self._queue.qsize() + len(self._waiting) + len(self.prompts) + len(self._live)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing.is_set()

    # ---- submitting (any thread) ---------------------------------------------------------------------------
    def submit(self, item: Row | Score | Call) -> Future:
        if not self.alive:
            raise EngineStopped(self._stopped_reason())
        if isinstance(item, Call):
            self._calls.put(item)
            with suppress(queue.Full):  # an idle engine waits on the row queue; a busy one runs calls
                self._queue.put_nowait(_WAKE_UP)  # between steps anyway
            return item.future
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise ServerBusy("the request queue is full; retry shortly") from None
        return item.future

    def call(self, fn: Callable[[], Any]) -> Future:
        return self.submit(Call(fn))

    def close(self, timeout_s: float = 30) -> None:
        """Stop the thread after its current step; every row not answered yet fails with EngineStopped.
        Returns within about `timeout_s` even if the thread is stuck in a forward."""
        self._closing.set()
        with suppress(queue.Full):  # else the loop sees _closing after its current step
            self._queue.put_nowait(None)
        self._thread.join(timeout=timeout_s)
        self._fail_queued(EngineStopped("the server is shutting down"))

    def _stopped_reason(self) -> str:
        if self.failure is not None:
            return f"the engine stopped after an internal error ({type(self.failure).__name__}); restart the server"
        return "the server is shutting down"

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the loop survives what it can; this is the last line
            self.failure = exc
            log.critical("the engine thread stopped", exc_info=exc)
        finally:
            stopped = EngineStopped(self._stopped_reason())
            self._shut_down(stopped)
            self._fail_queued(stopped)

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._run_calls()
            idle = not self._live and not self._waiting and not self.prompts
            # rows stay in the queue while the batch has no room for them, so a full queue still turns
            # requests away (ServerBusy) instead of piling them up here
            room = self.max_batch - len(self._live) - len(self.prompts) - len(self._waiting)
            arrived = self._collect(block=idle, room=room)
            if arrived is None:
                return
            self._run_calls()
            self._waiting.extend(r for r in arrived if r.future.set_running_or_notify_cancel())
            try:
                self._round()
            except Exception as exc:  # a bug on some path: fail the rows in flight, keep serving
                self._recover(exc)

    def _round(self) -> None:
        """One round: prompt tokens within the budget (short passes, rows joining, long passes, in that
        order: `prompt_work`), then one decode step for the live rows."""
        self._drop_abandoned_passes()
        spent = self._run_passes(self.prompts.short_round())
        spent += self._admit(self.prompts.budget - self.prompts.reserve - spent)
        self._run_passes(self.prompts.long_round(self.prompts.budget - spent))
        if self._live:
            self._step()

    def _recover(self, exc: Exception) -> None:
        log.exception("engine step failed; failing the rows in flight and carrying on", exc_info=exc)
        self.stats.recovered_errors += 1
        self._shut_down(exc)

    def _run_calls(self) -> None:
        for call in _drained(self._calls):
            self._run_call(call)

    def _fail_queued(self, exc: BaseException) -> None:
        """Fail what was submitted but never taken (the thread is gone)."""
        for item in (*_drained(self._queue), *_drained(self._calls)):
            if isinstance(item, (Row, Score, Call)) and not item.future.done():
                item.future.set_exception(exc)

    def _collect(self, block: bool, room: int) -> list[Row] | None:
        """What has arrived, up to `room` rows: blocking for the first item and then `batch_window_s` for more
        when idle, else whatever is queued now. None: the engine is closing."""
        items: list[Row] = []
        if block:
            first = self._queue.get()
            while first is _WAKE_UP:  # a Call arrived: run it before waiting on
                self._run_calls()
                first = self._queue.get()
            if first is None:
                return None
            items.append(first)
            deadline = time.monotonic() + self.batch_window_s
        while len(items) < room:
            try:
                if block:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _WAKE_UP:
                continue
            if item is None:
                self._queue.put(None)  # seen on the next round, after what arrived with it
                break
            items.append(item)
        return items

    def _shut_down(self, exc: BaseException) -> None:
        """Fail every row in the batch or waiting for it with `exc`, and start the batch afresh."""
        handles = set(self.decoding.clear()) | set(self._live)
        for handle in handles:
            live = self._live.pop(handle, None)
            if live is not None:
                live.pin.close()
                self._fail(live.row, exc)
        self.decoding.finished.clear()
        for p in self.prompts.clear():
            self._fail(p.item, exc)
        while self._waiting:
            self._fail(self._waiting.popleft(), exc)

    def _run_call(self, call: Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except Exception as exc:  # reported to the caller; the engine carries on
            call.future.set_exception(exc)

    # ---- continuous batching ---------------------------------------------------------------------------------
    def _admit(self, budget: int) -> int:
        """Move waiting rows on while the batch has room: short rows join it in one forward of at most
        `budget` padded tokens, long rows and prompts to score start a pass, rows the batch cannot take run
        apart. Returns the prompt tokens run."""
        joining: list[tuple[Row, ExitStack, str | None]] = []
        apart: list[Row] = []
        # their adapter is draining: they wait, and load it afresh once it is unloaded
        parked: list[Row | Score] = []
        longest = 0
        while self._waiting and len(self._live) + len(self.prompts) + len(joining) < self.max_batch:
            item = self._waiting.popleft()
            if self._ended_before_start(item):
                continue
            pin = ExitStack()
            try:
                key = pin.enter_context(self.cache.pinned([item.adapter])).get(item.adapter)
            except AdapterDraining:  # only work in flight pins a draining adapter, so this ends soon
                parked.append(item)
                continue
            except CacheFullError:
                if self._live or joining or self.prompts:  # every resident adapter is in use: wait
                    self._waiting.appendleft(item)
                    break
                self._fail(item, CacheFullError("no room to load the adapter; retry shortly"))
                continue
            except Exception as exc:
                self._fail(item, exc)
                continue
            chunkable = self.continuous and (key is None or mixable_refusal(self.model, key) is None)
            if isinstance(item, Score):
                run = PromptPass(self.model, item.prompt, key, top=item.top, whole=not chunkable)
                self.prompts.start(item, pin, run)
            elif not chunkable:
                pin.close()
                apart.append(item)
            elif not self.prompts.is_short(len(item.prompt)):
                self.prompts.start(
                    item, pin, PromptPass(self.model, item.prompt, key, prefixes=self.prefixes)
                )
            elif joining and (len(joining) + 1) * max(longest, len(item.prompt)) > budget:
                pin.close()  # no room in this round: first in line for the next
                self._waiting.appendleft(item)
                break
            else:
                joining.append((item, pin, key))
                longest = max(longest, len(item.prompt))
        self._waiting.extendleft(reversed(parked))
        if apart:
            self._run_rows(apart)
        if joining:
            self._join(joining)
        return len(joining) * longest

    def _ended_before_start(self, item: Row | Score) -> bool:
        """Answer an item whose client left or whose deadline passed before it started."""
        if item.cancelled:
            if isinstance(item, Row):
                self._answer(item, Completion([], "cancelled", len(item.prompt)))
            else:
                self._fail(item, RequestCancelled("the client went away"))
            return True
        if item.overdue:
            self._time_out(item)
            return True
        return False

    def _join(self, joining: list[tuple[Row, ExitStack, str | None]]) -> None:
        try:
            steps = self.decoding.add(
                [r.prompt for r, _, _ in joining],
                [key for _, _, key in joining],
                max_new_tokens=[r.max_new_tokens for r, _, _ in joining],
                sampling=[r.sampling for r, _, _ in joining],
            )
        except ContinuousBatchingUnsupported:
            self.continuous = False  # the model's cache: every row from now on runs as fixed batches
            for _, pin, _ in joining:
                pin.close()
            self._run_rows([r for r, _, _ in joining])
            return
        except Exception as exc:
            if len(joining) > 1:  # find the row that fails; the others still join
                for one in joining:
                    self._join([one])
            else:
                (row, pin, _) = joining[0]
                pin.close()
                self._fail(row, exc)
            return
        self.stats.batches += 1
        for step, (row, pin, _) in zip(steps, joining, strict=True):
            row.stop_reached = False
            self._live[step.row] = Live(row, pin)
        self._note_batch_size()
        self._deliver(steps)

    def _step(self) -> None:
        try:
            steps = self.decoding.step()
        except Exception as exc:
            # the batch is lost; rows that streamed nothing yet are rerun alone, the others fail
            log.warning("decode step failed (%s: %s); rerunning its rows alone", type(exc).__name__, exc)
            lost = [self._live.pop(h) for h in self.decoding.clear() if h in self._live]
            self.decoding.finished.clear()
            for live in lost:
                live.pin.close()
                if live.row.streamed:
                    self._fail(live.row, exc)
                else:
                    self._run_row_alone(live.row)
            return
        self.stats.decode_steps += 1
        self._deliver(steps)

    def _deliver(self, steps: list[Step]) -> None:
        """Hand each row its new token, end rows whose client left or whose stop string appeared, and answer
        rows that ended."""
        for step in steps:
            live = self._live[step.row]
            row = live.row
            if step.error is not None:  # named by the model-side key: say it with the name the client used
                del self._live[step.row]
                live.pin.close()
                self.decoding.finished.pop(step.row, None)
                self._fail(row, type(step.error).of(step.error.what, row.adapter))
                continue
            if step.token is not None:
                live.tokens.append(step.token)
                stream_token(row, step.token, step.logprob)
            finished = step.finished
            if finished is None and self._ends_early(row, live.tokens):
                self.decoding.end(step.row)
                finished = "cancelled"
            if finished is not None:
                del self._live[step.row]
                live.pin.close()
                self._answer(row, self.decoding.completion(step.row))

    def _answer(self, row: Row, result: Completion) -> None:
        if row.future.done():
            return
        if result.finish_reason == "cancelled" and not row.cancelled and not row.stop_reached and row.overdue:
            self._time_out(row)  # ended early by its deadline, not by its client
            return
        if row.stop_reached:  # its tokens run up to the one that completed the stop string
            result.finish_reason = "stop"
            self.stats.rows_ended_at_stop_string += 1
        elif result.finish_reason == "cancelled":
            self.stats.cancelled_rows += 1
        self.stats.rows += 1
        row.future.set_result(result)

    def _fail(self, row: Row | Score, exc: BaseException) -> None:
        if row.future.done():
            return
        self.stats.failed_rows += 1
        row.future.set_exception(exc)

    def _time_out(self, row: Row | Score) -> None:
        self.stats.timed_out_rows += 1
        self._fail(row, RequestTimeout("the request passed its deadline before it was answered; retry later"))

    def _note_batch_size(self) -> None:
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._live))
        adapters = {live.row.adapter for live in self._live.values()}
        self.stats.most_adapters_in_batch = max(self.stats.most_adapters_in_batch, len(adapters))

    def _ends_early(self, row: Row, new_tokens: list[int]) -> bool:
        """Whether a row must end now: its client went away, its deadline passed, or its text has reached a
        stop string."""
        if row.stops and not row.stop_reached:
            if row.watch is None:
                row.watch = StopWatch(self.tokenizer, row.stops)
            row.stop_reached = row.watch.reached(new_tokens)
        return row.cancelled or row.stop_reached or row.overdue


def _drained(items: queue.Queue | queue.SimpleQueue) -> Iterator[Any]:
    """What a queue holds now, taken without waiting."""
    while True:
        try:
            yield items.get_nowait()
        except queue.Empty:
            return
