"""Run one trial: the real trainer in its own process, watched for evaluations so a pruner can stop it."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.atomic import write_text_atomic
from .worker import ERROR_FILE, serve_trial

POLL_S = 0.5
TERMINATE_GRACE_S = 10.0


@dataclass
class TrialOutcome:
    """What a finished trial process left: its state, the objective, its costs, or why it failed."""

    state: str  # "complete" | "pruned" | "failed" | "interrupted"
    metric: float | None = None
    costs: dict[str, float] = field(default_factory=dict)
    adapter_dir: str | None = None
    reason: str | None = None  # failed: "diverged: ...", "out_of_memory: ...", "error: ...", "killed by ..."
    reports: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) of each evaluation
    majority_baseline: dict[str, Any] | None = None  # the run's summary.json says it (classification)


def _new_evaluations(metrics_file: Path, seen: int, metric: str) -> tuple[list[tuple[int, float]], int]:
    """Validation events appended to metrics.jsonl since line `seen` (a partial last line waits); the
    validation losses `eval.loss_every` adds between evaluations are not among them."""
    if not metrics_file.exists():
        return [], seen
    lines = metrics_file.read_text().split("\n")
    complete = lines[:-1]  # the text after the last newline may still be being written
    found = []
    for line in complete[seen:]:
        record = json.loads(line)
        if record.get("split") == "validation" and metric in record and not record.get("loss_only"):
            found.append((int(record["step"]), float(record[metric])))
    return found, len(complete)


def adapter_bytes(folder: Path) -> int:
    """Bytes of the weights a user ships: every .safetensors file in the saved folder."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _costs(summary: dict[str, Any]) -> dict[str, float]:
    saved = Path(summary["saved_to"])
    return {
        "trainable_params": int(summary.get("trainable_params") or 0),
        "adapter_bytes": int(adapter_bytes(saved)),
        "s_per_step": float(summary["seconds_per_step"]),
        "peak_rss_mib": float(summary["peak_rss_mib"]),
    }


def _failure_reason(trial_dir: Path, returncode: int) -> str:
    record_file = trial_dir / ERROR_FILE
    if record_file.exists():
        record = json.loads(record_file.read_text())
        return f"{record['kind']}: {record['message']}"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (often the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"error: the trainer exited with status {returncode}; see {trial_dir / 'train.log'}"


class TrainerProcess:
    """A trial's trainer process: forked from a server that has imported the trainer (worker.serve_trial),
    or, where multiprocessing has no forkserver, a fresh interpreter. `wait(timeout)` returns as soon as the
    process ends; `returncode` is negative for a signal, as subprocess gives it."""

    def __init__(
        self, config_file: Path, log_file: Path, env: dict[str, str], fork_server: bool = True
    ) -> None:
        if fork_server and "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first trial)
            self._child = context.Process(
                target=serve_trial, args=(str(config_file), str(log_file), env, os.getpid()), daemon=False
            )
            self._child.start()
            self._popen = None
        else:
            command = [sys.executable, "-m", "deltatune.sweep.worker", str(config_file), str(os.getpid())]
            with log_file.open("w") as log:  # own session: a Ctrl-C at the terminal reaches the sweep
                self._popen = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else self._child.exitcode

    def wait(self, timeout: float | None) -> int | None:
        if self._popen is not None:
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        self._child.join(timeout)
        return self._child.exitcode

    def terminate(self) -> None:
        (self._popen or self._child).terminate()

    def kill(self) -> None:
        (self._popen or self._child).kill()


# What the fork server imports once, so that each trial forked from it starts with them loaded.
PRELOAD = ["deltatune.sweep.worker", "torch", "transformers", "deltatune.train"]


def _stop(process: TrainerProcess) -> None:
    if process.returncode is None:
        process.terminate()
        if process.wait(TERMINATE_GRACE_S) is None:
            process.kill()
            process.wait(None)


def slot_env(slot: int, jobs: int, cpus: int, gpus: int, visible: str | None = None) -> dict[str, str]:
    """The environment of the trial in parallel slot `slot` of `jobs`: its share of the CPU threads, and on a
    machine with GPUs one device per slot (round robin over CUDA_VISIBLE_DEVICES when it is set), so
    parallel trials neither oversubscribe the cores nor all land on GPU 0."""
    if jobs <= 1:
        return {}
    env = {"OMP_NUM_THREADS": str(max(1, cpus // jobs))}
    devices = [d for d in (visible or "").split(",") if d.strip()] or [str(i) for i in range(gpus)]
    if gpus > 0 and devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)].strip()
    return env


def run_trial(
    raw_config: dict[str, Any],
    trial_dir: Path,
    metric: str,
    *,
    env: dict[str, str] | None = None,
    should_prune: Callable[[int, float], bool] = lambda step, value: False,
    abandoned: Callable[[], bool] = lambda: False,
    heartbeat: Callable[[], None] = lambda: None,
) -> TrialOutcome:
    """Train `raw_config` in `trial_dir` (its output_dir); after each evaluation ask `should_prune(step,
    value)` (which also reports it to the study); stop the process if it says so, or if `abandoned()` turns
    true. Every evaluation is asked, those the trainer wrote after the last poll too. `heartbeat()` runs every
    poll."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    config_file = trial_dir / "trial.yaml"
    write_text_atomic(config_file, yaml.safe_dump(raw_config, sort_keys=False))
    env = {**os.environ, **(env or {})}
    outcome = TrialOutcome(state="complete")
    seen = 0
    process = TrainerProcess(config_file, trial_dir / "train.log", env)
    try:
        while process.wait(POLL_S) is None:
            heartbeat()
            found, seen = _new_evaluations(trial_dir / "metrics.jsonl", seen, metric)
            outcome.reports += found
            if any(should_prune(step, value) for step, value in found):
                outcome.state = "pruned"
                break
            if abandoned():
                outcome.state, outcome.reason = "interrupted", "the sweep was interrupted"
                break
    finally:
        _stop(process)
    if outcome.state != "complete":
        return outcome
    found, seen = _new_evaluations(trial_dir / "metrics.jsonl", seen, metric)
    outcome.reports += found
    for step, value in found:  # evaluations written after the last poll reach the study too (it ended:
        should_prune(step, value)  # nothing is left to prune)
    if process.returncode != 0:
        return TrialOutcome(
            state="failed", reason=_failure_reason(trial_dir, process.returncode), reports=outcome.reports
        )
    # A finished trial is never resumed (an interrupted one restarts clean), so its resumable checkpoints
    # (trainable weights + optimizer state, ~3x the adapter) are dead weight across many trials.
    shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
    summary = json.loads((trial_dir / "summary.json").read_text())
    outcome.metric = summary["best_metric"]
    outcome.costs = _costs(summary)
    outcome.adapter_dir = summary["saved_to"]
    outcome.majority_baseline = summary.get("majority_baseline")
    return outcome
