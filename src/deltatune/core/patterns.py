"""Regular expressions from adapter configs (`target_modules`, `exclude_modules`, `rank_pattern` keys), matched
under a time bound.

Adapter folders come from other people. A pattern with nested quantifiers such as `(a+)+$` makes a
backtracking matcher take exponential time on some names, and the stdlib `re` cannot be interrupted: one
such file stalled a server for minutes. These patterns go through the `regex` package (what transformers
itself uses), which avoids much of that backtracking and takes a timeout; all the matching done for one
adapter shares a budget (`match_budget`), so a pattern that is merely slow on every name is refused too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import regex

from .errors import AdapterConfigError

MAX_PATTERN_CHARS = 1000
BUDGET_S = 1.0  # all matching for one adapter; legitimate patterns need microseconds per module name
_deadline: ContextVar[float | None] = ContextVar("deltatune_pattern_deadline", default=None)


@contextmanager
def match_budget(seconds: float = BUDGET_S) -> Iterator[None]:
    """Patterns matched inside the block share `seconds` (an enclosing budget keeps its own deadline)."""
    if _deadline.get() is not None:
        yield
        return
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


@functools.lru_cache(maxsize=512)
def compiled(pattern: str) -> regex.Pattern:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterConfigError(
            f"a module-name pattern of {len(pattern)} characters is over the limit of {MAX_PATTERN_CHARS}; "
            "list the module names instead"
        )
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise AdapterConfigError(f"{pattern[:80]!r} is not a valid regular expression: {exc}") from None


def matches(pattern: str, name: str, *, whole: bool = True) -> bool:
    """`re.fullmatch(pattern, name)` (or `re.match` with whole=False), within the current budget."""
    deadline = _deadline.get()
    timeout = BUDGET_S if deadline is None else deadline - time.monotonic()
    if timeout <= 0:
        _too_slow(pattern)
    compiled_pattern = compiled(pattern)
    try:
        if whole:
            return compiled_pattern.fullmatch(name, timeout=timeout) is not None
        return compiled_pattern.match(name, timeout=timeout) is not None
    except TimeoutError:
        _too_slow(pattern)


def _too_slow(pattern: str) -> None:
    raise AdapterConfigError(
        f"matching the pattern {pattern[:80]!r} against the model's module names took over {BUDGET_S:g} s: it "
        "backtracks catastrophically (nested quantifiers such as (a+)+). Simplify it, or list the module "
        "names instead"
    )
