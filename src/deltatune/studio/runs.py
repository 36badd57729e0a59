"""The run folders under the studio's root, read from the files a run writes (run.json, config.yaml,
summary.json, metrics.jsonl, the adapter's deltatune.json): the studio never shares a trainer's process. A
folder that is half-written, corrupt or from an older deltatune shows what could not be read, never an error
page."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.config import CONFIG_NAME, read_json_object
from ..core.io import PROVENANCE_NAME
from ..core.provenance import schema_problem
from ..train.run_record import RUN_RECORD, read_run_record, writer_alive

MAX_DEPTH = 3  # runs/NAME, runs/GROUP/NAME, runs/SWEEP/trials/NNNN
SKIPPED = {"checkpoints", "adapter", "model", "trackers", "wandb", "mlruns", "mlartifacts", "tensorboard"}
ADAPTER_FOLDER = "adapter"  # where a run keeps its adapter
LOG_NAME = "train.log"  # what a run the studio launched printed (stdout and stderr)
MAX_TEXT_BYTES = 1 << 20  # the most of a config, log tail or metrics chunk one page reads


class OutsideRoot(ValueError):
    """A run name that leads outside the studio's root (`..`, an absolute path, a symlink out)."""


class NoAdapter(LookupError):
    """A run that has kept no adapter yet."""


@dataclass
class Run:
    name: str  # the folder relative to the root, with "/" between parts: the run's id in URLs
    path: Path
    status: str = "unknown"  # running | finished | failed | killed | unknown
    problems: list[str] = field(default_factory=list)  # what could not be read, and why
    notes: list[str] = field(default_factory=list)  # what an older or newer deltatune wrote differently
    written_by: str | None = None  # the deltatune version the adapter's provenance names
    error: str | None = None  # a failed run's error, as run.json recorded it
    objective: str | None = None
    method: str | None = None
    metric: str | None = None
    best_metric: float | None = None
    steps: int | None = None
    max_steps: int | None = None
    adapter_bytes: int | None = None
    base: str | None = None  # the config's model.path
    task: str | None = None  # causal_lm | classification
    system_prompt: str | None = None  # the data's, which a chat with its adapter starts from
    has_adapter: bool = False  # an adapter/ folder a playground can load (one is kept at each checkpoint)
    updated: float = 0.0  # the newest file's time

    @property
    def updated_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.updated)) if self.updated else ""


def resolve_run(root: Path, name: str) -> Path:
    """The folder of run `name`, refused when it is not inside `root` once links are followed."""
    root = root.resolve()
    if name.startswith("/") or ".." in name.split("/"):
        raise OutsideRoot(f"{name!r} leads outside the studio's runs folder")
    if not name or "\\" in name or any(p in ("", ".") for p in name.split("/")):
        raise OutsideRoot(
            f"not a run name: {name!r} (a folder under the studio's runs folder, like group/run)"
        )
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise OutsideRoot(f"{name!r} is outside the studio's runs folder")
    return path


def adapter_folder(root: Path, name: str) -> Path:
    """Run `name`'s adapter folder: OutsideRoot for a name leading outside `root`, NoAdapter when the run has
    kept none yet."""
    folder = resolve_run(root, name) / ADAPTER_FOLDER
    if not folder.is_dir():
        raise NoAdapter(f"run {name!r} has no adapter yet (one is kept at each checkpoint)")
    return folder


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / RUN_RECORD).is_file()


def find_runs(root: Path) -> list[Run]:
    """Every run folder under `root` (up to MAX_DEPTH deep), newest first."""
    root = root.resolve()
    found = [read_run(root, path) for path in walk(root, is_run_folder)]
    return sorted(found, key=lambda r: r.updated, reverse=True)


def walk(root: Path, stop: Callable[[Path], bool]) -> Iterator[Path]:
    """The folders under `root`, up to MAX_DEPTH deep, for which `stop(path)` holds (they are not looked into);
    hidden folders (atomic writes' staging, the studio's jobs) and SKIPPED ones are left out."""
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SKIPPED:
                continue
            path = Path(entry.path)
            if stop(path):
                yield path
            elif depth + 1 < MAX_DEPTH:
                pending.append((path, depth + 1))


def placed(root: Path, name: str, key: str, error: type[Exception]) -> Path:
    """The folder a form's `key` names under `root`; `error` (its message opening with the key) when it names
    none or leads outside."""
    name = name.strip().rstrip("/")
    if not name:
        raise error(f"{key}: name the folder (under the studio's runs folder)")
    try:
        return resolve_run(root, name)
    except OutsideRoot as exc:
        raise error(f"{key}: {exc}") from None


def read_run(root: Path, path: Path) -> Run:
    run = Run(name=path.relative_to(root).as_posix(), path=path)
    run.updated = max((f.stat().st_mtime for f in _top_files(path)), default=0.0)
    config = _guarded(run, "config.yaml", lambda: _yaml(path / "config.yaml"))
    if isinstance(config, dict):
        training, adapter, evaluation, model = (
            _section(config, k) for k in ("training", "adapter", "eval", "model")
        )
        run.base, run.task = model.get("path"), model.get("task", "causal_lm")
        run.system_prompt = _section(config, "data").get("system_prompt")
        run.objective = training.get("objective", "sft")
        run.max_steps = training.get("max_steps")
        run.method = adapter.get("method")
        run.metric = evaluation.get("metric", "loss")
    summary = _guarded(run, "summary.json", lambda: _json(path / "summary.json"))
    if isinstance(summary, dict):
        run.best_metric, run.steps = summary.get("best_metric"), summary.get("steps")
    elif (path / "metrics.jsonl").is_file():
        run.steps = last_step(path / "metrics.jsonl")
    weights = [f for name in ("adapter", "model") for f in (path / name).glob("*.safetensors")]
    run.adapter_bytes = sum(f.stat().st_size for f in weights) or None
    run.has_adapter = (path / ADAPTER_FOLDER / CONFIG_NAME).is_file()
    record = _guarded(run, RUN_RECORD, lambda: read_run_record(path))
    run.status = _status(record, summary)
    if record is None and isinstance(summary, dict):
        run.notes.append(
            "older format: no run.json (a deltatune from before it existed); status from summary.json"
        )
    if run.has_adapter:
        _read_schema(run, path / ADAPTER_FOLDER / PROVENANCE_NAME)
    if isinstance(record, dict) and record.get("state") == "failed":
        run.error = str(record.get("error"))
    return run


def _read_schema(run: Run, file: Path) -> None:
    """The provenance's schema version and the deltatune that wrote it, with a note when this version reads it
    differently (none: older than provenance records; a higher one: newer than this deltatune)."""
    provenance = _guarded(run, f"{ADAPTER_FOLDER}/{PROVENANCE_NAME}", lambda: _json(file))
    if not isinstance(provenance, dict):
        return
    environment = provenance.get("environment")
    run.written_by = environment.get("deltatune") if isinstance(environment, dict) else None
    version = provenance.get("schema_version")
    problem = schema_problem(version)
    if version is None:  # a full fine-tune's record from before schema versions: shown, and nothing wrong
        run.notes.append(f"older format: {ADAPTER_FOLDER}/{PROVENANCE_NAME} {problem}")
    elif problem:
        run.problems.append(f"{ADAPTER_FOLDER}/{PROVENANCE_NAME} {problem}")


def _status(record: Any, summary: Any) -> str:
    """From run.json when the run wrote one (a "running" run whose process is gone was killed outright);
    from summary.json for runs of older deltatune versions."""
    if isinstance(record, dict):
        state = record.get("state")
        if state == "running":
            return "running" if writer_alive(record) else "killed"
        if state in ("finished", "failed", "killed"):
            return state
    return "finished" if isinstance(summary, dict) else "unknown"


def _section(config: dict, key: str) -> dict:
    """A config section as a dict ({} when it is missing or not a mapping: the problems list says so)."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _top_files(path: Path):
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def _guarded(run: Run, what: str, read):
    """`read()`, or None with the reason kept in run.problems (a missing file is no problem)."""
    try:
        return read()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        run.problems.append(f"{what}: {str(exc).splitlines()[0][:300]}")
        return None


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it: 100 configs a page


def _yaml(path: Path) -> Any:
    return yaml.load(read_text(path), Loader=_LOADER)  # noqa: S506 (a safe loader)


def _json(path: Path) -> dict[str, Any]:
    return read_json_object(path, path.name, ValueError)


def read_json_file(path: Path) -> dict[str, Any] | None:
    """A page's JSON file, or None when it is missing or unreadable (the runs list says why)."""
    try:
        return _json(path)
    except (OSError, ValueError):
        return None


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """A text file's first `limit` bytes (decoded leniently: a page shows what is there)."""
    with path.open("rb") as handle:
        return handle.read(limit).decode("utf-8", errors="replace")


def tail_text(path: Path, limit: int = 16_384) -> str:
    """The last `limit` bytes of a log: where a crashed trainer's traceback is."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete metrics.jsonl lines from byte `offset`, and the offset after the last complete one (a line
    still being written waits for the next read). A line that is not JSON is skipped."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read(MAX_TEXT_BYTES)
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    records = []
    for line in chunk[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records, offset + end


def last_step(path: Path) -> int | None:
    text = tail_text(path, 4096).strip().splitlines()
    for line in reversed(text):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None
