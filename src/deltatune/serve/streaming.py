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

from ..runtime.sampling import TokenLogprob
from .logprobs import shared_length
from .stops import first_stop


class TextDeltas:
    """The growing text of one row, handed out in pieces that never need to be taken back; and, with
    `track_tokens`, which tokens those pieces hold (`settled`), for log-probabilities that go out with their
    text."""

    def __init__(self, tokenizer: Any, stops: list[str], track_tokens: bool = False) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.overlap = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # the text of all the tokens so far
        # the text of the first k tokens, for the k not yet settled and handed out (`forget`): where those
        # tokens' text starts. Kept only with track_tokens: a long answer's prefixes add up to its square
        self.prefixes: dict[int, str] | None = {0: ""} if track_tokens else None
        self.sent = ""
        self.stopped = False  # a stop string was reached: nothing more goes out
        self.final: str | None = None  # the row's whole (stop-cut) text, once it is done

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.prefixes is not None:
            self.prefixes[len(self.tokens)] = text
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
        self.final = final_text
        return self._release(final_text)

    def settled(self, first: int = 0) -> int:
        """How many tokens (counting on from `first`, already settled) the text sent so far holds: each one
        whose text is all sent, and, once the row is done, each one whose text starts before the end of its
        final text (`logprobs.for_answer`'s rule, so a streamed answer carries the same tokens)."""
        k = first
        while k < len(self.tokens):
            start = self.start(k)
            if self.final is not None:
                if start >= len(self.final):
                    break
            elif not start < len(self.sent) or shared_length(self.prefixes[k + 1], self.text) > len(
                self.sent
            ):
                break
            k += 1
        return k

    def start(self, k: int) -> int:
        """Where token k's text starts: the length of the text before it that the row's text keeps (a
        character the tokens before it only begin is the next token's)."""
        return shared_length(self.prefixes[k], self.final if self.final is not None else self.text)

    def forget(self, settled: int) -> None:
        """Drop what the tokens before `settled` needed, once they are handed out."""
        for k in [k for k in self.prefixes if k < settled]:
            del self.prefixes[k]

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


Item = tuple[int, "int | None", "TokenLogprob | None"]  # (row, token or None once it ended, logprob)


class TokenFeed:
    """Per-row tokens from the engine thread into the event loop: `on_token(row)` makes the row's callback,
    `watch(row, future)` marks the row finished when its future is."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Item] = asyncio.Queue()

    def on_token(self, row: int) -> Callable[[int, TokenLogprob | None], None]:
        return lambda token, logprob: self.loop.call_soon_threadsafe(
            self.queue.put_nowait, (row, token, logprob)
        )

    def watch(self, row: int, future: Future) -> None:
        future.add_done_callback(
            lambda _: self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, None, None))
        )

    async def items(self, rows: int) -> AsyncIterator[Item]:
        """(row, token, logprob) until every row has sent (row, None, None)."""
        open_rows = rows
        while open_rows:
            row, token, logprob = await self.queue.get()
            open_rows -= token is None
            yield row, token, logprob
