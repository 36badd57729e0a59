"""TensorBoard: event files under `report.dir`/tensorboard/RUN, written by torch's SummaryWriter. TensorBoard
keeps no artifacts: the config, data summary, provenance and outcome go in as text."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Outcome, RunDescription, Tracker


def _block(value: object) -> str:
    """TensorBoard renders text as markdown: JSON in a code block keeps its layout."""
    return "```\n" + json.dumps(value, indent=1, default=str) + "\n```"


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def prepare(self, store: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer_class = SummaryWriter

    def start(self, run: RunDescription) -> str:
        log_dir = run.store / "tensorboard" / run.run_name
        # resuming, the steps after the checkpoint are redone: TensorBoard hides what the killed attempt
        # logged from there on (purge_step), as metrics.jsonl drops them
        purge = None if run.resumed_at is None else run.resumed_at + 1
        self.writer = self.writer_class(log_dir=str(log_dir), purge_step=purge)
        if run.resumed_at is None:
            self.writer.add_text("config", _block(run.config), 0)
            self.writer.add_text("data", _block(run.data_summary), 0)
        return str(log_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, outcome: Outcome) -> None:
        step = int((outcome.summary or {}).get("steps") or 0)
        self.writer.add_text("status", outcome.status, step)
        if outcome.summary is not None:
            self.writer.add_text("summary", _block(outcome.summary), step)
        if outcome.provenance is not None:
            self.writer.add_text("provenance", _block(outcome.provenance), step)
        self.writer.close()
