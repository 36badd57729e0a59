"""Training runs the studio starts, stops and resumes: each is `deltatune train` in its own process (its own
session, so a stop reaches torchrun's workers too), printing into the run folder's train.log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..task.config import ConfigError, TrainConfig, validate_config
from ..train.checkpoint import list_checkpoints
from ..train.run_record import live_writer
from .form import config_yaml
from .runs import LOG_NAME, placed, resolve_run

LAUNCH_NAME = "launch.yaml"  # the config as the form gave it; the run writes its resolved config.yaml


class LaunchRefused(ValueError):
    """The launch would clash with a run, or its folder is not under the studio's root."""


def checked_config(root: Path, raw: dict[str, Any]) -> tuple[TrainConfig, Path]:
    """The config the form describes, checked as `deltatune train` checks it, with its output folder placed
    under `root` (the form names it relative to the root; anything leading outside is refused)."""
    out = placed(root, str(raw.get("output_dir") or ""), "output_dir", LaunchRefused)
    return validate_config(raw | {"output_dir": str(out)}, str(out / LAUNCH_NAME)), out


def _busy(out: Path) -> str | None:
    """Why a new run may not start in `out`, or None."""
    if record := live_writer(out):
        return f"{out.name} is being written by a running trainer (pid {record['pid']}); stop it first"
    if list_checkpoints(out / "checkpoints"):
        return (
            f"{out.name} already holds a run with checkpoints; resume it from its page, or pick another name"
        )
    return None


def launch(root: Path, raw: dict[str, Any]) -> Path:
    """Start a new run from the form's raw config; returns its folder. Raises ConfigError (the CLI's message)
    or LaunchRefused."""
    cfg, out = checked_config(root, raw)
    if why := _busy(out):
        raise LaunchRefused(why)
    out.mkdir(parents=True, exist_ok=True)
    config = out / LAUNCH_NAME
    config.write_text(config_yaml(cfg.to_dict() | {"output_dir": str(out)}))
    _start(out, [str(config)])
    return out


def resume(root: Path, name: str) -> Path:
    """Continue a stopped or killed run from its last checkpoint, with the config it wrote."""
    out = resolve_run(root, name)
    if live_writer(out):
        raise LaunchRefused(f"{name} is still running")
    if not list_checkpoints(out / "checkpoints"):
        raise LaunchRefused(f"{name} has no checkpoint to resume from (training.checkpoint_every)")
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"{out / 'config.yaml'} is missing: this folder was not written by a deltatune run")
    _start(out, [str(out / "config.yaml"), "--resume"])
    return out


def _start(out: Path, args: list[str]) -> subprocess.Popen:
    return spawn(["train", *args], out / LOG_NAME)


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """`deltatune ARGS` in its own session (a stop reaches all its processes), printing into `log`; relative
    paths resolve from where the studio runs. Its exit is collected on a thread, so an ended process never
    lingers as a zombie that liveness checks would see."""
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "deltatune", *args], stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    threading.Thread(target=process.wait, name="studio-reaper", daemon=True).start()
    return process


def stop(root: Path, name: str) -> bool:
    """Ask a running trainer to stop (Ctrl-C: it records itself as killed and closes its trackers' runs); its
    last checkpoint stays, so it can be resumed. False when nothing of it is running."""
    record = live_writer(resolve_run(root, name))
    return record is not None and interrupt(record["pid"])


def interrupt(pid: int) -> bool:
    """Ctrl-C to process `pid`: to its whole session when it leads one (started here, torchrun's workers and a
    sweep's trials included), else to it alone (started from a terminal). False when it is gone."""
    try:
        group = os.getpgid(pid)
        if group == pid:
            os.killpg(group, signal.SIGINT)
        else:
            os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    return True
