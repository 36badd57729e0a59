"""Report commands the studio starts (`deltatune compare`, `forgetting`, `bench`, `sweep`), each in its own
process writing a report folder under the studio's root. The commands write their reports whole at the end
(a sweep: after each trial), so what a job printed lives apart, in ROOT/.studio-jobs/NAME/ (job.json: the
command and its process; output.log), and the jobs list reads it from there."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..core.atomic import write_text_atomic
from ..train.run_record import process_start, writer_alive
from .launcher import interrupt, spawn
from .reports import KINDS, report_kind
from .runs import NoAdapter, OutsideRoot, adapter_folder, placed, read_run, resolve_run, tail_text

JOBS = ".studio-jobs"  # hidden: the runs and reports lists skip it
LOG = "output.log"
COMMANDS = {"compare": "compare", "forgetting": "forgetting", "latency": "bench", "sweep": "sweep"}


class JobRefused(ValueError):
    """What the form asked for cannot start; the message says what to change."""


@dataclass
class Job:
    name: str  # the report folder it writes, relative to the root
    kind: str
    command: list[str]
    started: float
    status: str  # running | finished | failed
    log: str = ""

    @property
    def started_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _adapter_of(root: Path, run: str) -> str:
    """A run's adapter folder (the form offers runs by name)."""
    try:
        return str(adapter_folder(root, run))
    except (OutsideRoot, NoAdapter) as exc:
        raise JobRefused(str(exc)) from None


def _base_of(root: Path, run: str) -> str:
    base = read_run(root, resolve_run(root, run)).base
    if not base:
        raise JobRefused(f"base: run {run!r} does not say its base model; name it")
    return base


def _required(values: dict[str, str], key: str, what: str) -> str:
    value = values.get(key, "").strip()
    if not value:
        raise JobRefused(f"{key}: {what}")
    return value


def command_for(root: Path, kind: str, values: dict[str, str], out: Path) -> list[str]:
    """The command line the form's values describe (every check beyond these is the command's own, and a
    refusal shows in its log as it would in a terminal)."""
    if kind == "compare":
        tasks = _lines(values.get("tasks", ""))
        if not tasks:
            raise JobRefused(
                "tasks: give at least one training config, one per line (NAME=CONFIG.yaml or a path)"
            )
        runs = [value for key, value in values.items() if key.startswith("runs_")]  # the ticked boxes
        adapters = [f"{run.replace('/', '-')}={_adapter_of(root, run)}" for run in runs]
        adapters += _lines(values.get("adapters", ""))
        if not adapters:
            raise JobRefused("adapters: tick a run or give an adapter folder (NAME=FOLDER)")
        argv = [a for task in tasks for a in ("--task", task)] + [
            a for ad in adapters for a in ("--adapter", ad)
        ]
        return ["compare", *argv, *(["--no-base"] if values.get("no_base") else [])]
    if kind in ("forgetting", "latency"):
        run = _required(values, "run", "pick the run whose adapter to measure")
        adapter = _adapter_of(root, run)
        base = values.get("base", "").strip() or _base_of(root, run)
        numbers = {"forgetting": ("texts", "prompts"), "latency": ("reps",)}[kind]
        argv = [COMMANDS[kind], "--base", base, "--adapter", adapter]
        argv += [
            a for key in numbers if values.get(key, "").strip() for a in (f"--{key}", values[key].strip())
        ]
        if kind == "latency" and values.get("batch_sizes", "").strip():
            argv += ["--batch-sizes", *values["batch_sizes"].split()]
        return argv
    if kind == "sweep":
        config = _required(values, "config", "give the training config to sweep")
        space = _required(values, "space", "give the space file (SPACE.yaml)")
        trials = _required(values, "trials", "how many trials")
        return ["sweep", config, "--space", space, "--trials", trials]
    raise JobRefused(f"no report kind {kind!r}; the kinds are {', '.join(KINDS)}")


def start(root: Path, kind: str, values: dict[str, str]) -> str:
    """Start the command for `kind`, writing its report into the folder the form names under `root`;
    returns that name. Refused while a job writes the same folder, and where a run or another kind of report
    already is."""
    out = placed(root, values.get("out", ""), "out", JobRefused)
    name = out.relative_to(root.resolve()).as_posix()
    argv = command_for(root, kind, values, out)
    found = report_kind(out) if out.is_dir() else None
    if out.is_dir() and found != kind and any(out.iterdir()):
        raise JobRefused(f"out: {name} already holds {found or 'other files'}; pick another name")
    if kind == "sweep" and found:
        raise JobRefused(
            f"out: {name} already holds a sweep; pick another name (or resume it from a terminal)"
        )
    folder = _job_folder(root, name)
    if (job := read_job(root, name)) and job.status == "running":
        raise JobRefused(f"out: a {job.kind} job is still writing {name}")
    folder.mkdir(parents=True, exist_ok=True)
    argv += ["--out", str(out)]
    (folder / LOG).unlink(missing_ok=True)
    started = time.time()
    process = spawn(argv, folder / LOG)
    record = {"kind": kind, "out": name, "command": ["deltatune", *argv], "pid": process.pid,
              "pid_start": process_start(process.pid), "host": socket.gethostname(), "started": started}  # fmt: skip
    write_text_atomic(folder / "job.json", json.dumps(record, indent=1) + "\n")
    return name


def _job_folder(root: Path, name: str) -> Path:
    return root / JOBS / quote(name, safe="")  # one folder per report name, "/" and all


def read_job(root: Path, name: str) -> Job | None:
    return _read_job(root, _job_folder(root, name))


def _read_job(root: Path, folder: Path) -> Job | None:
    try:
        record = json.loads((folder / "job.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        return None
    name = str(record.get("out", ""))
    try:
        out = resolve_run(root, name)
    except OutsideRoot:
        return None
    if writer_alive(record):
        status = "running"
    else:
        written = 0.0
        with contextlib.suppress(OSError):  # a report being swapped in this instant: read again next poll
            written = (out / KINDS[record["kind"]][0]).stat().st_mtime
        status = "finished" if written >= float(record.get("started") or 0) else "failed"
    return Job(name, record["kind"], list(record.get("command") or []), float(record.get("started") or 0),
               status, tail_text(folder / LOG))  # fmt: skip


def find_jobs(root: Path) -> list[Job]:
    try:
        folders = [Path(e.path) for e in os.scandir(root / JOBS) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    jobs = [job for folder in folders if (job := _read_job(root, folder))]
    return sorted(jobs, key=lambda j: j.started, reverse=True)


def stop(root: Path, name: str) -> bool:
    """Ask a running job to stop (Ctrl-C: a sweep records its running trials as interrupted)."""
    job_record = _job_folder(root, name) / "job.json"
    try:
        record: dict[str, Any] = json.loads(job_record.read_text())
    except (OSError, ValueError):
        return False
    return writer_alive(record) and interrupt(record["pid"])
