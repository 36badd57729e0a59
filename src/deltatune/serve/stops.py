"""Stop strings: where the text of a request that gave `stop` ends.

Checked on the decoded text of all new tokens so far, since a token's text can depend on its neighbours; the
engine checks after every new token, so a row ends at its stop string instead of running on to `max_tokens`.
"""

from __future__ import annotations

from typing import Any


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    return min((text.index(s) for s in stops if s in text), default=None)


def reaches_stop(tokenizer: Any, tokens: list[int], stops: list[str]) -> bool:
    return first_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops) is not None
