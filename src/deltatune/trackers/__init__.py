"""The experiment trackers a run reports to (`report.to` in the config: tensorboard, mlflow, wandb, trackio, named
as transformers' `report_to` names them): metrics with their step, the resolved config, the data summary, the
provenance, and the adapter as an artifact where the tracker keeps artifacts. Each tracker is an optional extra,
local or offline unless its own environment variable says otherwise, and all of them are fed from one background
thread: a slow or failing tracker warns once and never slows or stops training."""

from __future__ import annotations

from .base import Outcome, RunDescription, Tracker
from .registry import TRACKERS, require_trackers, tracker_class
from .reporter import IDS_FILE, Reporter

__all__ = [
    "IDS_FILE",
    "TRACKERS",
    "Outcome",
    "Reporter",
    "RunDescription",
    "Tracker",
    "require_trackers",
    "tracker_class",
]
