"""The run's side of `report.to`: the trackers are prepared as the run starts (their imports and stores load
while the data and the model do), hear every metrics.jsonl event, and record how the run ended."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..task.config import TrainConfig
from ..trackers import IDS_FILE, Outcome, Reporter

TRACKERS_DIR = "trackers"  # report.dir's default, inside the run folder


def tracker_store(cfg: TrainConfig) -> Path:
    """Where the trackers' local stores and offline files go: report.dir, else OUTPUT_DIR/trackers."""
    return Path(cfg.report.dir) if cfg.report.dir else Path(cfg.output_dir) / TRACKERS_DIR


def open_reporter(cfg: TrainConfig, enabled: bool) -> Reporter | None:
    """The trackers of `report.to`, on the rank that writes; None when there are none."""
    report = cfg.report
    if not (report.to and enabled):
        return None
    return Reporter(report.to, tracker_store(cfg), Path(cfg.output_dir) / IDS_FILE)


@contextlib.contextmanager
def closed_on_error(reporter: Reporter | None) -> Iterator[None]:
    """A run that raises closes its trackers' runs as failed (killed on Ctrl-C or a caught signal) before the
    error goes on."""
    try:
        yield
    except BaseException as exc:
        if reporter is not None:
            killed = isinstance(exc, KeyboardInterrupt | SystemExit)
            reporter.finish(Outcome("killed" if killed else "failed", artifacts=False))
        raise
