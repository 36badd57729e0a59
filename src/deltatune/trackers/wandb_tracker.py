"""Weights & Biases: offline by default (its files under `report.dir`/wandb, sent later with `wandb sync`);
WANDB_MODE=online sends as it goes. W&B's console capture and system sampling stay off: the training process's
output is deltatune's, and sampling would cost the trainer CPU."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .base import Outcome, RunDescription, Tracker


def artifact_name(run_name: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", run_name) + "-adapter"


class WandbTracker(Tracker):
    name = "wandb"

    def prepare(self, store: Path) -> None:
        import wandb

        wandb.setup()  # starts W&B's service process

    def start(self, run: RunDescription) -> str:
        import wandb

        run.store.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, silent=True)
        resume = {"id": run.resume_id, "resume": "allow"} if run.resume_id else {}
        self.run = wandb.init(
            project=run.project, name=run.run_name, dir=str(run.store), config=run.config,
            mode=os.environ.get("WANDB_MODE", "offline"), settings=settings, reinit="create_new", **resume,
        )  # fmt: skip
        self.run.summary["data"] = run.data_summary
        return self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, outcome: Outcome) -> None:
        import wandb

        self.run.summary["status"] = outcome.status
        if outcome.summary is not None:
            self.run.summary["result"] = outcome.summary
        if outcome.provenance is not None:
            self.run.summary["provenance"] = outcome.provenance
        if outcome.artifacts and outcome.saved_to is not None and outcome.saved_to.is_dir():
            artifact = wandb.Artifact(
                artifact_name(self.run.name or "run"), type="model", metadata=outcome.provenance or {}
            )
            artifact.add_dir(str(outcome.saved_to))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if outcome.status == "finished" else 1)
