"""run.json: which process is writing a run folder, and how its run ended (finished, failed with the error, or
killed by Ctrl-C / a signal it could catch). A run killed outright leaves "running" behind with a dead process,
which readers such as the studio show as killed. A second run into a folder whose writer is alive is refused."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.atomic import write_text_atomic
from ..core.config import read_json_object
from ..core.errors import DeltatuneError

RUN_RECORD = "run.json"


class RunInUseError(DeltatuneError):
    """Another live process is writing this run folder."""


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the pid, it names
    one process even after the pid is reused. None when there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def writer_alive(record: dict[str, Any]) -> bool:
    """Whether the process the record names still runs (only this host's processes can be seen)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    return process_start(record["pid"]) == record.get("pid_start") is not None


def read_run_record(out: Path) -> dict[str, Any] | None:
    """The folder's run.json; None when absent. A corrupt one raises ValueError naming the file."""
    path = out / RUN_RECORD
    if not path.is_file():
        return None
    return read_json_object(path, "a run record", ValueError)


def live_writer(out: Path) -> dict[str, Any] | None:
    """The record of the live process writing `out`, or None (no record, a corrupt one, or a run that ended or
    whose process is gone)."""
    try:
        record = read_run_record(out)
    except ValueError:
        return None
    return record if record and record.get("state") == "running" and writer_alive(record) else None


@contextlib.contextmanager
def claim_run(out: Path, enabled: bool) -> Iterator[None]:
    """Mark `out` as written by this process for the block, and record how the block ended."""
    if not enabled:
        yield
        return
    if earlier := live_writer(out):  # a corrupt record is overwritten, never trusted
        raise RunInUseError(
            f"{out} is being written by another run (pid {earlier['pid']}, started {earlier.get('started')}); "
            "wait for it to end or stop it, or pick another output_dir"
        )
    pid = os.getpid()
    record = {"pid": pid, "pid_start": process_start(pid), "host": socket.gethostname(),
              "started": time.time(), "state": "running", "error": None, "ended": None}  # fmt: skip
    _write(out, record)
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as exc:
        _write(out, record | {"state": "killed", "error": type(exc).__name__, "ended": time.time()})
        raise
    except BaseException as exc:
        _write(
            out, record | {"state": "failed", "error": f"{type(exc).__name__}: {exc}", "ended": time.time()}
        )
        raise
    _write(out, record | {"state": "finished", "ended": time.time()})


def _write(out: Path, record: dict[str, Any]) -> None:
    write_text_atomic(out / RUN_RECORD, json.dumps(record, indent=1) + "\n")
