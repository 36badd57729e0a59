"""Prompt tokens the engine runs between decode steps, under one token budget per round.

Every round of the engine runs at most `budget` prompt tokens (prefills of rows joining the batch, and
prompts scored for echo with log-probabilities), then one decode step for the rows already answering. A
prompt longer than half the budget runs as a `PromptPass`, a chunk per round, so no request, however long
its prompts, holds the model for more than one round (`serve` measured 16 x 2,048-token prompts holding it
for minutes). The order inside a round, as vLLM's scheduler orders chunked prefills:

1. short passes (at most half the budget left to run), oldest first: work admitted earlier goes first;
2. short rows joining the batch, batched into one forward, with what is left of the first half;
3. long passes, oldest first, with the other half and anything left over.

So a short request never waits behind a long one for more than a round, and a long one advances by at least
half the budget every round, whatever keeps arriving.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

from ..runtime.decode import ContinuousBatchingUnsupported
from ..runtime.prompt_pass import PromptPass
from .work import Live, Row, Score


@dataclass
class Pass:
    """A prompt in progress: the request it serves, its adapter held resident (`pin`), the pass itself."""

    item: Row | Score
    pin: ExitStack
    run: PromptPass


class PromptWork:
    def __init__(self, budget: int) -> None:
        if budget < 2:
            raise ValueError(f"the prompt-token budget per round must be at least 2, got {budget}")
        self.budget = budget
        self.passes: list[Pass] = []  # oldest first

    def __len__(self) -> int:
        return len(self.passes)

    @property
    def half(self) -> int:
        return self.budget // 2

    def is_short(self, tokens: int) -> bool:
        return tokens <= self.half

    @property
    def reserve(self) -> int:
        """The part of a round kept for long passes: half the budget while there are any."""
        return self.half if any(not self.is_short(p.run.remaining) for p in self.passes) else 0

    def start(self, item: Row | Score, pin: ExitStack, run: PromptPass) -> None:
        self.passes.append(Pass(item, pin, run))

    def short_round(self) -> Iterator[tuple[Pass, int, Exception | None]]:
        """Run the short passes that fit in the round's first part; yields (pass, tokens run, error)."""
        left = self.budget - self.reserve
        for p in [p for p in self.passes if self.is_short(p.run.remaining)]:
            if p.run.remaining > left:
                break
            ran, error = _advance(p, left)
            left -= ran
            yield p, ran, error

    def long_round(self, left: int) -> Iterator[tuple[Pass, int, Exception | None]]:
        """Run long passes, oldest first, with `left` tokens (at least the reserve); yields as short_round."""
        left = max(left, self.reserve)
        for p in [p for p in self.passes if not self.is_short(p.run.remaining)]:
            if left <= 0:
                return
            ran, error = _advance(p, left)
            left -= ran
            yield p, ran, error

    def remove(self, p: Pass) -> None:
        self.passes.remove(p)
        p.pin.close()

    def clear(self) -> list[Pass]:
        """Drop every pass (their adapters are released); returns them."""
        dropped, self.passes = self.passes, []
        for p in dropped:
            p.pin.close()
        return dropped


def _advance(p: Pass, budget: int) -> tuple[int, Exception | None]:
    before = p.run.remaining
    try:
        p.run.advance(budget)
    except Exception as exc:  # this prompt's own failure (non-finite scores, ...): it fails alone
        return before - p.run.remaining, exc
    return before - p.run.remaining, None


class PromptRounds:
    """Part of `Engine`: what happens to passes as they advance (which provides the decode batch, the live
    rows, stats and the ways to answer a row)."""

    def _drop_abandoned_passes(self) -> None:
        for p in list(self.prompts.passes):
            if p.item.cancelled or p.item.overdue:
                self.prompts.remove(p)
                self._ended_before_start(p.item)

    def _run_passes(self, results: Iterator[tuple[Pass, int, Exception | None]]) -> int:
        """Run passes (a round's `short_round` or `long_round`); answer scored prompts that finished and move
        finished prefills into the decode batch. Returns the prompt tokens run."""
        spent = 0
        for p, ran, error in results:
            spent += ran
            self.stats.prompt_chunks += 1
            if error is not None:
                self.prompts.remove(p)
                self._fail(p.item, error)
            elif p.run.finished:
                self.prompts.passes.remove(p)  # the adapter stays pinned while the row decodes
                if isinstance(p.item, Score):
                    p.pin.close()
                    self.stats.scored_prompts += 1
                    if not p.item.future.done():
                        p.item.future.set_result(p.run.scores)
                else:
                    self._join_prefilled(p)
        return spent

    def _join_prefilled(self, p: Pass) -> None:
        row = p.item
        try:
            steps = self.decoding.add_prefilled(
                p.run, max_new_tokens=row.max_new_tokens, sampling=row.sampling
            )
        except ContinuousBatchingUnsupported:
            self.continuous = False  # the model's cache: every row from now on runs as fixed batches
            p.pin.close()
            self._run_rows([row])
            return
        except Exception as exc:
            p.pin.close()
            self._fail(row, exc)
            return
        self.stats.batches += 1
        row.stop_reached = False
        self._live[steps[0].row] = Live(row, p.pin)
        self._note_batch_size()
        self._deliver(steps)
