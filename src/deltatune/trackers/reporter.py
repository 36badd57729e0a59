"""Feeds the trackers from one background thread, so the training loop only ever puts an event on a queue.

A tracker that raises (disk full, server gone, a bug) is retired with one warning and the others go on; a
tracker that stalls fills the queue, and past its bound events are dropped and counted rather than waited for.
Only the end of the run waits, and for at most `FINISH_WAIT_S`, so the last metrics and the artifact land."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.atomic import write_text_atomic
from ..core.config import read_json_object
from ..core.errors import DeltatuneWarning
from .base import Outcome, RunDescription, Tracker
from .registry import tracker_class

IDS_FILE = "trackers.json"  # in the run folder: each tracker's run id, so --resume continues the same runs
QUEUE_BOUND = 10_000  # events waiting for slow trackers; past it new events are dropped, never waited for
FINISH_WAIT_S = 300.0  # the most the end of a run waits for its trackers to flush (a hang guard)


class Reporter:
    """The trackers named in `report.to`, for one run on the rank that writes."""

    def __init__(
        self,
        names: list[str],
        store: Path,
        ids_path: Path,
        *,
        factory: Callable[[str], type[Tracker]] = tracker_class,
    ):
        """Prepare the trackers at once (their imports, their stores) in the background, while the caller
        loads data and model; their runs open at `start`."""
        self.names = list(names)
        self.failures: dict[str, str] = {}  # tracker -> what failed, in its words
        self.dropped = 0
        self._ids_path = ids_path
        self._queue: queue.Queue = queue.Queue(QUEUE_BOUND)
        self._live: dict[str, Tracker] = {}
        self._thread = threading.Thread(
            target=self._drain, args=(store, factory), name="deltatune-trackers", daemon=True
        )
        self._thread.start()

    def start(self, run: RunDescription) -> None:
        """Open every tracker's run (resuming, the runs trackers.json names)."""
        earlier = _read_ids(self._ids_path) if run.resumed_at is not None else {}
        self._put(("start", run, earlier))

    # --- the training loop's side: never blocks ---------------------------------------------------------------
    def log_record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl event: its numbers, keyed `split/name`, at its step."""
        split = record.get("split", "train")
        metrics = {
            f"{split}/{key}": float(value)
            for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, int | float) and not isinstance(value, bool)
        }
        if metrics:
            self._put(("log", int(record["step"]), metrics))

    def _put(self, event: tuple) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                warnings.warn(
                    f"report.to: the trackers are {QUEUE_BOUND} events behind; new events are dropped (and "
                    "counted) rather than slowing training",
                    DeltatuneWarning,
                    stacklevel=3,
                )

    def finish(self, outcome: Outcome, wait_s: float = FINISH_WAIT_S) -> bool:
        """Close every tracker's run with `outcome`; True when all of them finished within `wait_s`."""
        with contextlib.suppress(queue.Full):  # a stalled tracker: the join below gives up after wait_s
            self._queue.put(("finish", outcome), timeout=wait_s)
        self._thread.join(wait_s)
        if self.dropped:
            warnings.warn(f"report.to: {self.dropped} events were dropped", DeltatuneWarning, stacklevel=2)
        if self._thread.is_alive():
            warnings.warn(
                f"report.to: {', '.join(self._live) or 'a tracker'} had not finished after {wait_s:.0f} s; its "
                "run may lack the last metrics or the artifact",
                DeltatuneWarning,
                stacklevel=2,
            )
            return False
        return True

    # --- the reporter's thread ----------------------------------------------------------------------------------
    def _drain(self, store: Path, factory) -> None:
        for name in self.names:
            self._guarded(name, "setup", self._prepare, name, factory, store)
        while True:
            event = self._queue.get()
            if event[0] == "start":
                self._start_runs(*event[1:])
            elif event[0] == "finish":
                for name, tracker in list(self._live.items()):
                    self._guarded(name, "finish", tracker.finish, event[1])
                return
            else:
                _, step, metrics = event
                for name, tracker in list(self._live.items()):
                    self._guarded(name, f"step {step}", tracker.log, step, metrics)

    def _prepare(self, name: str, factory, store: Path) -> None:
        tracker = factory(name)()
        tracker.prepare(store)
        self._live[name] = tracker

    def _start_runs(self, run: RunDescription, earlier: dict[str, str]) -> None:
        ids = dict(earlier)
        for name, tracker in list(self._live.items()):
            resumed = replace(run, resume_id=earlier.get(name))
            self._guarded(name, "start", self._start_one, name, tracker, resumed, ids)
        if self._live:
            self._write_ids(ids)

    @staticmethod
    def _start_one(name: str, tracker: Tracker, run: RunDescription, ids: dict[str, str]) -> None:
        ids[name] = tracker.start(run)

    def _guarded(self, name: str, what: str, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:  # any failure of a tracker is its own: training goes on without it
            self._live.pop(name, None)
            self.failures[name] = f"{what}: {type(exc).__name__}: {exc}"
            warnings.warn(
                f"report.to: {name} failed at {what} ({type(exc).__name__}: {exc}); training goes on without it",
                DeltatuneWarning,
                stacklevel=1,
            )

    def _write_ids(self, ids: dict[str, str]) -> None:
        try:
            write_text_atomic(self._ids_path, json.dumps(ids, indent=1) + "\n")
        except OSError as exc:
            warnings.warn(
                f"report.to: could not write {self._ids_path} ({exc}); a resumed run will start new tracker runs",
                DeltatuneWarning,
                stacklevel=1,
            )


def _read_ids(path: Path) -> dict[str, str]:
    """The first attempt's run ids; anything unreadable means new runs, never a failed resume."""
    try:
        ids = read_json_object(path, "the trackers' run ids", ValueError)
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in ids.items() if isinstance(value, str)}
