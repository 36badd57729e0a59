"""Regular expressions from adapter configs (`target_modules`, `exclude_modules`, `rank_pattern` keys), matched
in time linear in the name, so the verdict on a pattern is the same on any machine at any load.

Adapter folders come from other people. A pattern with nested quantifiers such as `(a+)+$` makes a
backtracking matcher take exponential time on some names. Such patterns go to RE2 (Google's matcher, no
backtracking: time linear in the name, memory bounded when it compiles), which runs every pattern PEFT users
write for module names; a pattern RE2 compiles to too large a program is refused, whatever the machine. The
one kind RE2 cannot run, lookaround and back-references (`^(?!.*vision).*q_proj`), goes to the `regex`
package, where all the matching for one adapter shares a hang guard (`match_budget`): generous, so that
only a pattern that would take minutes on an idle machine reaches it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import re2
import regex

from .errors import AdapterConfigError

MAX_PATTERN_CHARS = 1000
HANG_GUARD_S = 60.0  # lookaround / back-reference patterns only: all their matching for one adapter
_deadline: ContextVar[float | None] = ContextVar("deltatune_pattern_deadline", default=None)
BACKTRACKING_ONLY = regex.compile(r"\(\?<?[=!]|\(\?P=|\\[1-9]|\\g<")  # what RE2 lacks


@contextmanager
def match_budget(seconds: float = HANG_GUARD_S) -> Iterator[None]:
    """Backtracking patterns matched inside the block share `seconds` (an enclosing budget keeps its own)."""
    if _deadline.get() is not None:
        yield
        return
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # its own message goes into ours; absl's log line would only repeat it
    return options


@functools.lru_cache(maxsize=512)
def compiled(pattern: str) -> Any:
    """The pattern compiled by RE2, or by `regex` when it needs lookaround or back-references."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterConfigError(
            f"a module-name pattern of {len(pattern)} characters is over the limit of {MAX_PATTERN_CHARS}; "
            "list the module names instead"
        )
    try:
        return re2.compile(pattern, _re2_options())
    except re2.error as exc:
        reason = str(exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc)
    try:
        backtracking = regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise AdapterConfigError(f"{pattern[:80]!r} is not a valid regular expression: {exc}") from None
    if BACKTRACKING_ONLY.search(pattern):
        return backtracking
    raise AdapterConfigError(
        f"the pattern {pattern[:80]!r} cannot be matched in time linear in the module name ({reason}): "
        "simplify it (fewer or smaller repetitions), or list the module names instead"
    )


def matches(pattern: str, name: str, *, whole: bool = True) -> bool:
    """`re.fullmatch(pattern, name)` (or `re.match` with whole=False)."""
    compiled_pattern = compiled(pattern)
    if not isinstance(compiled_pattern, regex.Pattern):
        found = compiled_pattern.fullmatch(name) if whole else compiled_pattern.match(name)
        return found is not None
    deadline = _deadline.get()
    timeout = HANG_GUARD_S if deadline is None else deadline - time.monotonic()
    try:
        if timeout <= 0:
            raise TimeoutError
        if whole:
            return compiled_pattern.fullmatch(name, timeout=timeout) is not None
        return compiled_pattern.match(name, timeout=timeout) is not None
    except TimeoutError:
        raise AdapterConfigError(
            f"matching the pattern {pattern[:80]!r} against the model's module names ran past the "
            f"{HANG_GUARD_S:g} s hang guard: its lookaround backtracks catastrophically. Simplify it, or "
            "list the module names instead"
        ) from None
