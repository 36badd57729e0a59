"""MLflow: one run in the experiment `report.project`, through MlflowClient (no global active run, so nothing
else in the process is touched). The store is MLFLOW_TRACKING_URI when set, else MLflow's local database
store, `report.dir`/mlflow.db, with the artifacts beside it in `report.dir`/mlartifacts
(`mlflow ui --backend-store-uri sqlite:///REPORT_DIR/mlflow.db` shows them)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..core.section import flatten
from .base import Outcome, RunDescription, Tracker

_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_BATCH = 100  # MLflow takes at most 100 params (and 1000 metrics) per log_batch call
_PARAM_CHARS = 6000  # the longest param value MLflow stores


def tracking_uri(store: Path) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store / 'mlflow.db').resolve()}"


class MlflowTracker(Tracker):
    name = "mlflow"

    def prepare(self, store: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(store))
        self.client.search_experiments(max_results=1)  # a new local store creates its tables here

    def start(self, run: RunDescription) -> str:
        from mlflow.entities import Param

        client = self.client
        if run.resume_id and self._reopen(run.resume_id):
            return self.run_id
        experiment = client.get_experiment_by_name(run.project)
        if experiment is None:  # artifacts beside the local database, not in the working directory
            local = not os.environ.get("MLFLOW_TRACKING_URI")
            where = (run.store / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = client.create_experiment(run.project, artifact_location=where)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = client.create_run(
            experiment_id, run_name=run.run_name, tags={"deltatune.store": str(run.store)}
        ).info.run_id
        params = [Param(key, _param_value(value)) for key, value in flatten(run.config).items()]
        for first in range(0, len(params), _BATCH):
            client.log_batch(self.run_id, params=params[first : first + _BATCH])
        client.log_dict(self.run_id, run.config, "config.json")
        client.log_dict(self.run_id, run.data_summary, "data_summary.json")
        return self.run_id

    def _reopen(self, run_id: str) -> bool:
        """The first attempt's run, back to RUNNING; False when the store no longer has it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, outcome: Outcome) -> None:
        if outcome.summary is not None:
            self.client.log_dict(self.run_id, outcome.summary, "summary.json")
        if outcome.provenance is not None:
            self.client.log_dict(self.run_id, outcome.provenance, "provenance.json")
        if outcome.artifacts and outcome.saved_to is not None and outcome.saved_to.is_dir():
            self.client.log_artifacts(self.run_id, str(outcome.saved_to), outcome.saved_to.name)
        self.client.set_terminated(self.run_id, status=_STATUS[outcome.status])


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= _PARAM_CHARS else text[: _PARAM_CHARS - 3] + "..."
