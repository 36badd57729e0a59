"""A sweep as an Optuna study: ask for a trial, train it in its own process, tell the result.

The study lives in a database (by default a SQLite file in the output folder), which is what makes a sweep
resumable and shareable: a sweep killed with SIGKILL resumes with `resume=True` and repeats no finished trial
(its interrupted trials are re-queued with the same parameters), and several processes or machines given one
database URL work on one study. `trials` is the study's total, counted in the database, not per process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import DeltatuneError
from .report import COSTS, BestRule, write_reports
from .space import SearchSpace, check_space
from .trial import TrialOutcome, run_trial, slot_env
from .worker import pid_alive

HEARTBEAT_S = 30.0  # how often a running trial's worker says it is alive
STATE_NAMES = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}


class SweepError(DeltatuneError, RuntimeError):
    """The sweep cannot start or continue: an existing study, a mismatched resume, a bad storage URL."""


@dataclass
class SweepSettings:
    config: dict[str, Any]  # the base training config, overrides applied, validated
    space: SearchSpace
    out: Path
    trials: int
    jobs: int = 1
    storage: str | None = None  # None: sqlite:///OUT/study.db
    study_name: str = "deltatune-sweep"
    timeout_s: float | None = None
    resume: bool = False
    seed: int = 0
    pruner: Any = "median"  # median | hyperband | none, or any optuna.pruners.BasePruner
    multi_objective: bool = False  # optimise the metric and rule.cost together (no pruning: Optuna has none)
    rule: BestRule = field(default_factory=BestRule)
    # A RUNNING trial whose worker has not written a heartbeat for this long is taken for dead (its machine
    # crashed or lost the database) and re-queued; trials of a dead process on this host are re-queued at once.
    stale_after_s: float = 600.0

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"


def redact(url: str) -> str:
    """The storage URL without its password, for logs and provenance."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: show the scheme only
        return url.split("://", 1)[0] + "://..."


def _fingerprint(settings: SweepSettings) -> dict[str, str]:
    config = {k: v for k, v in settings.config.items() if k != "output_dir"}
    space = [
        (p.name, p.kind, p.choices, p.presets, p.low, p.high, p.log, p.step, p.when)
        for p in settings.space.params
    ]
    return {
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "space_sha256": hashlib.sha256(repr(space).encode()).hexdigest(),
    }


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()  # counted without creating a CUDA context in this process


class Sweep:
    def __init__(self, settings: SweepSettings):
        import optuna

        self.s = settings
        self.optuna = optuna
        from ..task.config import TrainConfig

        base = TrainConfig.model_validate(settings.config)
        self.metric, self.mode = base.eval.metric, base.metric_mode
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # first Ctrl-C: start no new trial
        self.abandon = threading.Event()  # second Ctrl-C: stop the running ones too
        self.interrupted_by: int | None = None  # the signal that stopped the sweep
        self.host = socket.gethostname()
        self.deadline = time.monotonic() + settings.timeout_s if settings.timeout_s else math.inf

    # --- the study ------------------------------------------------------------------------------------------
    def open_study(self):
        optuna = self.optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.corners_checked = check_space(self.s.space, self.s.config)  # before anything is written
        self.s.out.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}} if self.s.storage_url.startswith("sqlite") else None
        for attempt in range(5):  # workers starting together race to create the tables; the loser retries
            try:
                storage = optuna.storages.RDBStorage(self.s.storage_url, engine_kwargs=engine_kwargs)
                break
            except Exception as exc:
                if attempt == 4:
                    raise SweepError(
                        f"cannot open the study storage {redact(self.s.storage_url)}: {exc}"
                    ) from None
                time.sleep(1 + attempt)
        exists = self.s.study_name in optuna.study.get_all_study_names(storage)
        if exists and not self.s.resume:
            raise SweepError(
                f"study {self.s.study_name!r} already exists in {redact(self.s.storage_url)}; pass --resume to "
                "continue it (finished trials are kept), or choose another --study-name or output folder"
            )
        direction = "maximize" if self.mode == "max" else "minimize"
        prior = self._existing_trials(storage) if exists else 0
        with warnings.catch_warnings():  # `group` (conditional spaces) is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=self.s.seed + prior,  # a resumed sweep must not replay the first sweep's random draws
                multivariate=True, group=True, constant_liar=self.s.jobs > 1,
            )  # fmt: skip
        study = optuna.create_study(
            storage=storage, sampler=sampler, pruner=self._pruner(), study_name=self.s.study_name,
            load_if_exists=True,
            **({"directions": [direction, "minimize"]} if self.s.multi_objective else {"direction": direction}),
        )  # fmt: skip
        self._check_same_sweep(study)
        self.study, self.storage = study, storage
        return study

    def _existing_trials(self, storage) -> int:
        study_id = storage.get_study_id_from_name(self.s.study_name)
        return len(storage.get_all_trials(study_id, deepcopy=False))

    def _pruner(self):
        pruners = self.optuna.pruners
        if isinstance(self.s.pruner, pruners.BasePruner):
            return self.s.pruner
        if self.s.multi_objective or self.s.pruner == "none":
            return pruners.NopPruner()
        if self.s.pruner == "hyperband":
            training = self.s.config["training"]
            every = self.s.config.get("eval", {}).get("every") or training["max_steps"]
            return pruners.HyperbandPruner(min_resource=every, max_resource=training["max_steps"])
        if self.s.pruner == "median":
            # judged from the second evaluation on: the first says more about the warm-up than the trial
            every = self.s.config.get("eval", {}).get("every") or 0
            return pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=every + 1)
        raise SweepError(f"unknown pruner {self.s.pruner!r}; choose median, hyperband or none")

    def _check_same_sweep(self, study) -> None:
        mine = {**_fingerprint(self.s), "metric": self.metric, "multi_objective": self.s.multi_objective}
        saved = study.user_attrs
        # a key not saved yet is written, not compared: another worker starting at the same moment may be
        # half-way through writing them (one attribute at a time), with the same values
        differing = [k for k, v in mine.items() if k in saved and saved[k] != v]
        if not differing:
            for key, value in mine.items():
                if key not in saved:
                    study.set_user_attr(key, value)
            return
        raise SweepError(
            f"study {self.s.study_name!r} was started with a different {', '.join(differing)}; a study's "
            "trials are only comparable under one config, search space and metric. Use the same files, "
            "or a new --study-name"
        )

    def _orphaned(self, trial) -> bool:
        """A RUNNING trial nobody is running: its sweep process on this host is gone, or (any host) its
        heartbeat is older than stale_after_s."""
        attrs = trial.user_attrs
        if attrs.get("host") == self.host and attrs.get("sweep_pid") is not None:
            return not pid_alive(int(attrs["sweep_pid"]))
        beat = attrs.get("heartbeat")
        return beat is not None and time.time() - float(beat) > self.s.stale_after_s

    def reclaim_interrupted(self) -> list[int]:
        """Mark orphaned trials failed (interrupted) and queue their parameters again, so the sweep redoes
        exactly those. Run at start and before every new trial, so live workers pick up a dead one's work."""
        running = self.optuna.trial.TrialState.RUNNING
        orphans = [t for t in self.study.get_trials(deepcopy=False, states=(running,)) if self._orphaned(t)]
        return [t.number for t in orphans if self._mark_interrupted(t.number, t.params)]

    def _mark_interrupted(self, number: int, params: dict[str, Any]) -> bool:
        """Fail the trial as interrupted and queue its parameters again; False when another worker got there
        first (the state change is the database's atomic claim, so the retry is queued once)."""
        storage = self.storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(self.s.study_name), number
        )
        try:
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_user_attr(
                trial_id, "reason", "interrupted: the sweep stopped during this trial"
            )
            storage.set_trial_state_values(trial_id, state=self.optuna.trial.TrialState.FAIL)
        except RuntimeError:  # UpdateFinishedTrialError (Optuna 5; a bare RuntimeError before)
            if storage.get_trial(trial_id).state.is_finished():
                return False
            raise
        self.study.enqueue_trial(params, user_attrs={"retry_of": number})
        return True

    # --- counting -------------------------------------------------------------------------------------------
    def _counted_and_running(self) -> tuple[int, int]:
        states = self.optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        counted = sum(
            t.state in (states.COMPLETE, states.PRUNED)
            or (t.state == states.FAIL and not t.user_attrs.get("interrupted"))
            for t in trials
        )
        return counted, sum(t.state == states.RUNNING for t in trials)

    def _ask(self, log):
        """The next trial, or None when the study has its trials, time is up, or the user stopped us."""
        with self.lock:
            if self.stopping.is_set() or time.monotonic() >= self.deadline:
                return None
            if reclaimed := self.reclaim_interrupted():
                log(f"re-queued trials {reclaimed}: their worker stopped while they ran")
            counted, running = self._counted_and_running()
            if counted + running >= self.s.trials:
                return None
            trial = self.study.ask()
            for key, value in {"host": self.host, "sweep_pid": os.getpid(), "heartbeat": time.time()}.items():
                trial.set_user_attr(key, value)
            return trial

    # --- running --------------------------------------------------------------------------------------------
    def trial_dir(self, number: int) -> Path:
        return self.s.out / "trials" / f"{number:04d}"

    def _trial_config(self, chosen: dict[str, Any], folder: Path) -> dict[str, Any]:
        raw = self.s.space.apply(self.s.config, chosen)
        raw["output_dir"] = str(folder.resolve())
        raw.setdefault("training", {})["progress"] = False
        report = raw.get("report") or {}
        if report.get("to"):  # every trial a run of one experiment, named by its number, in one store
            raw["report"] = report | {
                "project": report.get("project") or self.s.study_name,
                "dir": report.get("dir") or str((self.s.out / "trackers").resolve()),
                "run_name": f"{self.s.study_name}-trial-{folder.name}",
            }
        return raw

    def _run_one(self, trial, slot: int) -> TrialOutcome:
        chosen = self.s.space.sample(trial)
        folder = self.trial_dir(trial.number)
        trial.set_user_attr("trial_dir", str(folder.resolve()))
        if folder.exists():  # a trial number is never reused within one storage, but an output folder can be
            shutil.rmtree(folder)
        env = slot_env(
            slot, self.s.jobs, os.cpu_count() or 1, _gpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
        )

        config = self._trial_config(chosen, folder)
        last_step = config["training"]["max_steps"]

        def should_prune(step: int, value: float) -> bool:
            if self.s.multi_objective or not math.isfinite(value):
                return False
            trial.report(value, step)
            # the final evaluation: training is done, so the trial completes whatever the pruner thinks
            return step < last_step and trial.should_prune()

        last_beat = time.time()

        def heartbeat() -> None:
            nonlocal last_beat
            if time.time() - last_beat >= HEARTBEAT_S:
                last_beat = time.time()
                trial.set_user_attr("heartbeat", last_beat)

        return run_trial(
            config, folder, self.metric, env=env,
            should_prune=should_prune, abandoned=self.abandon.is_set, heartbeat=heartbeat,
        )  # fmt: skip

    def _tell(self, trial, outcome: TrialOutcome) -> None:
        states = self.optuna.trial.TrialState
        trial.set_user_attr("evaluations", outcome.reports)
        for key, value in outcome.costs.items():
            trial.set_user_attr(key, value)
        if outcome.adapter_dir:
            trial.set_user_attr("adapter_dir", outcome.adapter_dir)
        if outcome.majority_baseline:
            trial.set_user_attr("majority_baseline", outcome.majority_baseline)
        if outcome.state == "interrupted":
            with self.lock:
                self._mark_interrupted(trial.number, trial.params)
            return
        if outcome.state == "complete" and (outcome.metric is None or not math.isfinite(outcome.metric)):
            outcome.state, outcome.reason = "failed", f"diverged: the best {self.metric} is {outcome.metric}"
        if outcome.reason:
            trial.set_user_attr("reason", outcome.reason)
        with self.lock:
            if outcome.state == "complete":
                values = (
                    [outcome.metric, outcome.costs[self.s.rule.cost]]
                    if self.s.multi_objective
                    else outcome.metric
                )
                self.study.tell(trial, values)
            elif outcome.state == "pruned":
                self.study.tell(trial, state=states.PRUNED)
            else:
                self.study.tell(trial, state=states.FAIL)

    def _worker(self, log, slot: int) -> None:
        while (trial := self._ask(log)) is not None:
            started = time.monotonic()
            try:
                outcome = self._run_one(trial, slot)
            except Exception as exc:  # the sweep itself failed around this trial: record, go on
                outcome = TrialOutcome(state="failed", reason=f"error: {type(exc).__name__}: {exc}")
            try:
                self._tell(trial, outcome)
            except RuntimeError as exc:  # finished meanwhile: another worker took this trial for dead
                log(f"trial {trial.number}: not recorded ({exc}); another worker re-queued it")
                continue
            log(self._describe(trial.number, trial.params, outcome, time.monotonic() - started))
            with self.lock:
                self.write_reports()

    def _describe(self, number: int, params: dict[str, Any], o: TrialOutcome, seconds: float) -> str:
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        if o.state == "complete":
            what = f"{self.metric}={o.metric:.4f}, adapter {o.costs['adapter_bytes'] / 2**20:.2f} MiB"
        elif o.state == "pruned":
            what = (
                f"pruned at step {o.reports[-1][0]} ({self.metric}={o.reports[-1][1]:.4f})"
                if o.reports
                else "pruned"
            )
        else:
            what = o.reason or ""
        return f"trial {number} {o.state} in {seconds:.0f} s: {what} [{shown}]"

    def run(self, log=print) -> dict[str, Any] | None:
        """Run trials until the study holds `trials` of them; return the best row (None: none complete)."""
        if not hasattr(self, "study"):
            self.open_study()
        log(f"search space: {len(self.s.space.params)} parameters, {self.corners_checked} corner configs valid; "
            f"study {self.s.study_name!r} in {redact(self.s.storage_url)}")  # fmt: skip
        self._warn_if_no_pruning(log)
        threads = [
            threading.Thread(target=self._worker, args=(log, slot), daemon=True)
            for slot in range(self.s.jobs)
        ]
        previous = self._install_interrupt(log)
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        with self.lock:
            best = self.write_reports()
        if best is not None:
            self.write_best(best)
        return best

    def _warn_if_no_pruning(self, log) -> None:
        if (
            self.s.pruner != "none"
            and not self.s.multi_objective
            and not self.s.config.get("eval", {}).get("every")
        ):
            log("note: eval.every is not set, so each trial evaluates once, at its end: the pruner has nothing "
                "to act on. Set eval.every to let hopeless trials stop early.")  # fmt: skip

    def _install_interrupt(self, log) -> dict[int, Any]:
        """Ctrl-C: start no new trial, let the running ones finish; again: stop them (re-queued for --resume).
        SIGTERM (a scheduler's stop) does both at once. Returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            self.interrupted_by = signum
            if signum == signal.SIGTERM or self.stopping.is_set():
                self.stopping.set()
                self.abandon.set()
                log("stopping the running trials; they are re-queued for --resume")
            else:
                self.stopping.set()
                log("interrupted: no new trials; waiting for the running ones to finish and be recorded "
                    "(Ctrl-C again to stop them now; they are re-queued for --resume)")  # fmt: skip

        return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}

    # --- results --------------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            state = STATE_NAMES.get(t.state.name, t.state.name.lower())
            if t.user_attrs.get("interrupted"):
                state = "interrupted"
            value = t.values[0] if t.values else None
            rows.append({
                "number": t.number, "state": state, "metric": value, "params": dict(t.params),
                **{c: _integral(t.user_attrs.get(c)) for c in COSTS},
                "majority_baseline": t.user_attrs.get("majority_baseline"),
                "duration_s": t.duration.total_seconds() if t.duration else None,
                "reason": t.user_attrs.get("reason") or _pruned_at(t), "host": t.user_attrs.get("host"),
                "trial_dir": t.user_attrs.get("trial_dir"), "adapter_dir": t.user_attrs.get("adapter_dir"),
            })  # fmt: skip
        return rows

    def write_reports(self) -> dict[str, Any] | None:
        header = {
            "study": self.s.study_name,
            "storage": redact(self.s.storage_url),
            "trials_asked": self.s.trials,
        }
        return write_reports(
            self.s.out, self.rows(), params=self.s.space.names, metric=self.metric, mode=self.mode,
            rule=self.s.rule, header=header, log_scale={p.name for p in self.s.space.params if p.log},
        )  # fmt: skip

    def write_best(self, best: dict[str, Any]) -> Path | None:
        """best/: the chosen trial's adapter, its provenance extended with the study, trial and rule."""
        from ..core.atomic import staged_folder
        from ..core.io import PROVENANCE_NAME, read_provenance
        from ..core.record import SweepRecord

        source = Path(best["adapter_dir"] or "")
        if not (source / PROVENANCE_NAME).is_file():
            raise SweepError(
                f"best trial {best['number']} ran on {best['host']}; its adapter {source} is not on this "
                "machine. Copy best/ from there, or rerun the sweep's report where it ran"
            )
        target = self.s.out / "best"
        for leftover in (*self.s.out.glob(".best.tmp-*"), *self.s.out.glob(".best.old-*")):
            shutil.rmtree(leftover, ignore_errors=True)  # from a sweep killed while writing best/
        # whole folders are swapped, so best/ never mixes files of two trials
        with staged_folder(target, whole=True) as staging:
            for item in source.iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
            record = read_provenance(staging)
            record.sweep = SweepRecord(
                study=self.s.study_name, storage=redact(self.s.storage_url), trial=best["number"],
                params=best["params"], metric={self.metric: best["metric"]},
                rule=self.s.rule.describe(self.metric), **_fingerprint(self.s),
            )  # fmt: skip
            (staging / PROVENANCE_NAME).write_text(record.to_json() + "\n")
        return target


def _pruned_at(trial) -> str | None:
    steps = trial.intermediate_values
    return f"pruned at step {max(steps)} of the trainer" if trial.state.name == "PRUNED" and steps else None


def load_base_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The sweep's base config, validated as `deltatune train` would, with every default filled in."""
    from ..task.config import load_train_config

    return load_train_config(path, overrides).to_dict()


def _integral(value: Any) -> Any:
    """A count stored as a float (studies written before counts were ints) reads back as an int."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
