"""Trackio: its local store (TRACKIO_DIR, else Trackio's own default; `trackio show` opens the dashboard), a
project per `report.project` and a run per training run, the adapter as an artifact."""

from __future__ import annotations

from pathlib import Path

from .base import Outcome, RunDescription, Tracker


class TrackioTracker(Tracker):
    name = "trackio"

    def prepare(self, store: Path) -> None:
        import trackio  # noqa: F401 (its import is the slow part)

    def start(self, run: RunDescription) -> str:
        import trackio

        self.run = trackio.init(
            project=run.project, name=run.run_name, config=run.config | {"data_summary": run.data_summary},
            resume="allow" if run.resume_id else "never", embed=False, auto_log_gpu=False, auto_log_cpu=False,
        )  # fmt: skip
        return run.run_name

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, outcome: Outcome) -> None:
        if outcome.artifacts and outcome.saved_to is not None and outcome.saved_to.is_dir():
            self.run.log_artifact(outcome.saved_to, name=f"{self.run.name}-adapter", type="model")
        self.run.finish()
