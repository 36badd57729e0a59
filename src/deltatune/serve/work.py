"""What HTTP handlers hand the serving engine (a Row to continue, a Call to run on its thread), what it
reports (Stats, the errors a client can be told), and how a streaming row gets its tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..runtime.sampling import Sampling, TokenLogprob
from .stops import StopWatch


@dataclass
class Row:
    """One prompt to continue: token ids, the adapter folder name (None: base) and its sampling settings
    (`Sampling`, checked where it was built; with `logprobs`, each new token's log-probability)."""

    prompt: list[int]
    adapter: str | None
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    # streaming: called on the engine thread per new token, with its log-probability when asked (else None)
    on_token: Callable[[int, TokenLogprob | None], None] | None = None
    stops: list[str] = field(default_factory=list)  # the row ends with the token that completes one of these
    deadline: float | None = None  # time.monotonic() after which the row is ended and fails (RequestTimeout)
    future: Future = field(default_factory=Future)
    streamed: int = 0  # tokens handed to on_token so far; a row that streamed some cannot be rerun
    cancelled: bool = False  # set from any thread (its client went away): the row ends at its next token
    stop_reached: bool = False  # ended at a stop string (its finish_reason is then "stop")
    watch: StopWatch | None = field(default=None, repr=False)  # the engine's incremental stop check

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        self.sampling = self.sampling.normalized()

    @property
    def overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@dataclass
class Live:
    """A row in the decode batch: its adapter held resident (`pin`) and its new tokens so far."""

    row: Row
    pin: ExitStack
    tokens: list[int] = field(default_factory=list)


@dataclass
class Score:
    """A prompt whose own tokens are scored (echo with log-probabilities): each token after the first with its
    log-probability given those before it, and the `top` most likely tokens there. It waits in the same
    queue as rows, under the same bound, deadline and cancellation."""

    prompt: list[int]
    adapter: str | None
    top: int = 0
    deadline: float | None = None
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # set from any thread (its client went away): dropped before its next chunk

    @property
    def overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@dataclass
class Call:
    """Other work that must run on the engine thread (adapter load / unload)."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


@dataclass
class Stats:
    rows: int = 0
    batches: int = 0  # prefills of rows joining the decode batch, and fixed batches
    decode_steps: int = 0
    largest_batch: int = 0  # most rows in one forward
    most_adapters_in_batch: int = 0
    failed_rows: int = 0
    cancelled_rows: int = 0
    timed_out_rows: int = 0
    rows_ended_at_stop_string: int = 0
    scored_prompts: int = 0  # echo with log-probabilities
    prompt_chunks: int = 0  # chunks of long prompts run between decode steps
    recovered_errors: int = 0  # unexpected errors the loop survived (each failed the rows it touched)


class ServerBusy(RuntimeError):
    """The queue is full; the client should retry later."""


class EngineStopped(RuntimeError):
    """The engine thread is not running (shut down, or ended by an error it could not survive)."""


class RequestTimeout(TimeoutError):
    """A row passed its deadline before it was answered."""


class RequestCancelled(RuntimeError):
    """A prompt was dropped before it was scored: its client went away."""


def streaming_callback(rows: list[Row]) -> Callable[[int, int, TokenLogprob | None], None] | None:
    """The generate callback passing each streaming row its tokens."""
    if not any(r.on_token for r in rows):
        return None
    return lambda index, token, logprob: stream_token(rows[index], token, logprob)


def stream_token(row: Row, token: int, logprob: TokenLogprob | None = None) -> None:
    """Pass a streaming row its next token; a callback that fails (the client went away) is dropped, and the
    row still completes."""
    if row.on_token is None:
        return
    try:
        row.on_token(token, logprob)
    except Exception:
        row.on_token = None
        return
    row.streamed += 1
