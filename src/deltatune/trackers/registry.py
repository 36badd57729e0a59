"""Which trackers exist, the extra each needs, and where each one's code is (imported only when used)."""

from __future__ import annotations

import importlib

from ..core.errors import require_extra
from .base import Tracker

# name (as in report.to) -> (the module it imports, the deltatune extra that installs it, its class)
TRACKERS: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard", "tensorboard_tracker:TensorBoardTracker"),
    "mlflow": ("mlflow", "mlflow", "mlflow_tracker:MlflowTracker"),
    "wandb": ("wandb", "wandb", "wandb_tracker:WandbTracker"),
    "trackio": ("trackio", "trackio", "trackio_tracker:TrackioTracker"),
}


def require_trackers(names: list[str]) -> None:
    """Refuse before training starts when a tracker's extra is missing, naming the pip line."""
    for name in names:
        module, extra, _ = TRACKERS[name]
        require_extra(extra, (module,), f"report.to: {name}")


def tracker_class(name: str) -> type[Tracker]:
    module, _, where = TRACKERS[name]
    file, cls = where.split(":")
    return getattr(importlib.import_module(f"{__package__}.{file}"), cls)
