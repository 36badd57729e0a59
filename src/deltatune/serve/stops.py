"""Stop strings: where the text of a request that gave `stop` ends.

A token's text can depend on its neighbours, so text is decoded in context; but the engine checks after every
new token, and decoding or searching the whole output each time would make the check grow with the output
(and a client sending many long stop strings a lever on everyone's latency). `StopWatch` decodes only a
window of the newest tokens and searches only the new text plus the overlap a stop string could straddle.
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"  # what decoding the first bytes of a character gives until its last token arrives


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    return min((text.index(s) for s in stops if s in text), default=None)


class StopWatch:
    """Whether a row's new text has reached one of `stops`, fed the row's token list as it grows."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.overlap = max((len(s) for s in stops), default=1) - 1
        self._start_over()

    def _start_over(self) -> None:
        self.text = ""  # the text of tokens[:read]
        self.tokens: list[int] = []
        self.context = 0  # tokens[context:read] are decoded again with the new ones, for their neighbours
        self.read = 0

    def reached(self, tokens: list[int]) -> bool:
        """Take the row's tokens so far (a list that only grows; one that does not, a rerun row's, starts
        over)."""
        if len(tokens) < len(self.tokens) or tokens[: len(self.tokens)] != self.tokens:
            self._start_over()
        self.tokens = list(tokens)
        decode = self.tokenizer.decode
        before = decode(tokens[self.context : self.read], skip_special_tokens=True)
        after = decode(tokens[self.context :], skip_special_tokens=True)
        if after.endswith(_INCOMPLETE) or not after.startswith(before):
            return False  # wait for the rest of the character (or of a merge that rewrote the window)
        new = after[len(before) :]
        start = max(len(self.text) - self.overlap, 0)
        self.text += new
        self.context, self.read = self.read, len(tokens)
        window = self.text[start:]
        return any(s in window for s in self.stops)
