"""What every tracker is told, and the three calls it answers: start a run, log a step's metrics, finish."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

Status = Literal["finished", "failed", "killed"]


@dataclass(frozen=True)
class RunDescription:
    """One training run as the trackers see it."""

    project: str  # MLflow's experiment, W&B's and Trackio's project
    run_name: str
    store: Path  # where local stores and offline files go (report.dir)
    config: dict[str, Any]  # the resolved config
    data_summary: dict[str, Any]
    resume_id: str | None = None  # this tracker's run id from the first attempt (trackers.json), on --resume
    resumed_at: int | None = None  # the step a resumed run continues after; its later steps are redone


@dataclass(frozen=True)
class Outcome:
    """How the run ended, and what it leaves."""

    status: Status
    summary: dict[str, Any] | None = None  # summary.json's content
    provenance: dict[str, Any] | None = None  # the saved adapter's deltatune.json
    saved_to: Path | None = None  # the adapter folder (or a full fine-tune's model folder)
    artifacts: bool = True  # log saved_to as an artifact where the tracker keeps artifacts


class Tracker(ABC):
    """One tracker's run. Every call comes from the reporter's thread, in order; an exception from any of
    them retires the tracker for the rest of the run (the reporter warns once)."""

    name: ClassVar[str]

    def prepare(self, store: Path) -> None:  # noqa: B027 (an optional hook)
        """The slow part that needs no run yet (imports, opening the store), done while the model loads."""

    @abstractmethod
    def start(self, run: RunDescription) -> str:
        """Open (or, resuming, reopen) the run; returns its id, which trackers.json keeps for --resume."""

    @abstractmethod
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of one step, keyed `train/loss`, `validation/accuracy`, ..."""

    @abstractmethod
    def finish(self, outcome: Outcome) -> None:
        """Record the outcome, log the artifact, close the run."""
