"""The engine's other path: rows the decode batch cannot take (adapters that are not plain LoRA, a model whose
KV cache it cannot merge) run as fixed batches through `runtime.generate`, grouped by sampling settings."""

from __future__ import annotations

from collections.abc import Callable

from ..runtime import Completion, generate
from ..runtime.sampling import Sampling
from .work import Row, streaming_callback


class FixedBatches:
    """Part of `Engine` (which provides the model, cache, stats and the ways to answer a row)."""

    def _run_rows(self, rows: list[Row]) -> None:
        groups: dict[Sampling, list[Row]] = {}  # a fixed batch shares its settings
        for row in rows:
            groups.setdefault(row.sampling, []).append(row)
        for group in groups.values():
            try:
                results = self._generate(group)
            except Exception as exc:
                if len(group) == 1:
                    self._fail(group[0], exc)
                    continue
                for row in group:  # find the row that fails; the others still get their answer
                    if row.streamed:  # its client has part of an answer already: a rerun would repeat it
                        self._fail(row, exc)
                    else:
                        self._run_row_alone(row)
                continue
            for row, result in zip(group, results, strict=True):
                self._answer(row, result)

    def _run_row_alone(self, row: Row) -> None:
        try:
            (result,) = self._generate([row])
        except Exception as exc:
            self._fail(row, exc)
        else:
            self._answer(row, result)

    def _generate(self, rows: list[Row]) -> list[Completion]:
        with self.cache.pinned(r.adapter for r in rows) as keys:
            results = generate(
                self.model,
                [r.prompt for r in rows],
                [keys[r.adapter] if r.adapter is not None else None for r in rows],
                max_new_tokens=[r.max_new_tokens for r in rows],
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_id,
                sampling=rows[0].sampling,  # a fixed batch holds rows of one setting (`same_settings`)
                on_token=streaming_callback(rows),
                stop_rows=self._row_ends(rows),
                continuous=self.continuous,  # False: a fixed-batch server, or a cache the engine cannot merge
            )
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        self.stats.most_adapters_in_batch = max(self.stats.most_adapters_in_batch, len(keys))
        return results

    def _row_ends(self, rows: list[Row]) -> Callable[[int, list[int]], bool] | None:
        """When a row of this batch ends early: its client went away or its text reached a stop string.
        None (no check per token) when no row streams or has stop strings."""
        for row in rows:
            row.stop_reached = False  # a row rerun alone after its batch failed starts over
        if not any(r.on_token or r.stops or r.deadline for r in rows):
            return None

        return lambda index, new_tokens: self._ends_early(rows[index], new_tokens)
