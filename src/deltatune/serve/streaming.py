"""stream=true: tokens arrive from the engine thread one at a time and leave as server-sent events of text.

Text is released so that the pieces concatenate to exactly the non-streamed answer: the token list is decoded
whole each time (a token's text can depend on its neighbours), an incomplete UTF-8 character at the end is
held back, and so is any tail that could still turn into a stop string.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from .stops import first_stop


class TextDeltas:
    """The growing text of one row, handed out in pieces that never need to be taken back."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.overlap = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was reached: nothing more goes out

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        # what was sent holds no stop string: search only where a new one could start
        start = max(len(self.sent) - self.overlap, 0)
        cut = first_stop(text[start:], self.stops)
        if cut is not None:
            self.stopped = True
            return self._release(text[: start + cut])
        end = len(text.rstrip("\ufffd"))  # the first bytes of a character the next token completes
        held = [  # a tail that is the start of a stop string waits for the next token
            size
            for stop in self.stops
            for size in range(1, min(len(stop) - 1, end) + 1)
            if text[end - size : end] == stop[:size]
        ]
        return self._release(text[: end - max(held, default=0)])

    def rest(self, final_text: str) -> str:
        """What is left to send once the row is done, given its full (stop-cut) text."""
        return self._release(final_text)

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class TokenFeed:
    """Per-row tokens from the engine thread into the event loop: `on_token(row)` makes the row's callback,
    `watch(row, future)` marks the row finished when its future is."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()

    def on_token(self, row: int) -> Callable[[int], None]:
        return lambda token: self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, token))

    def watch(self, row: int, future: Future) -> None:
        future.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, None)))

    async def items(self, rows: int) -> AsyncIterator[tuple[int, int | None]]:
        """(row, token) until every row has sent (row, None)."""
        open_rows = rows
        while open_rows:
            row, token = await self.queue.get()
            open_rows -= token is None
            yield row, token
