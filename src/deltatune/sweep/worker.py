"""The process one trial runs in: `deltatune train` plus what a sweep needs.

It dies with the sweep (Linux: PR_SET_PDEATHSIG), so a sweep killed with SIGKILL leaves no orphan trainer
writing into a trial folder. It records why it failed in `trial_error.json` (diverged, out of memory, or the
error itself), so the study stores a reason, not a log.

A sweep forks its trials from a server process that imported torch, transformers and the trainer once
(`serve_trial`, through multiprocessing's forkserver): a fresh interpreter spends ~2 s on those imports, which
is most of a short trial. Each trial is still a process of its own, forked from that pristine server, never
from a process that ran a trial. Where forkserver is missing, `python -m deltatune.sweep.worker CONFIG.yaml
PARENT_PID` runs it in a fresh interpreter.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

ERROR_FILE = "trial_error.json"
TRAINER_PID_FILE = "trainer.pid"
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the sweep terminates its children itself when it can
        pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _die_with(pid: int) -> None:
    """End this process when process `pid` (the sweep, not its parent) ends: a thread waits on a pidfd for
    it. The fork server cannot be relied on to go first: every process it forks holds its liveness pipe,
    so it outlives the sweep for as long as any trial runs."""
    try:
        watched = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3, other systems): ask every second
        watched = None

    def watch() -> None:
        if watched is not None:
            select.select([watched], [], [])
        else:
            while pid_alive(pid):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-sweep", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """(kind, message) for the study: 'diverged', 'out_of_memory' or 'error'."""
    from ..train import NonFiniteLossError

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, NonFiniteLossError):
        return "diverged", str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "can't allocate" in str(exc):
        return "out_of_memory", text
    return "error", text


def serve_trial(config: str, log: str, env: dict[str, str], sweep_pid: int) -> None:
    """A trial in a child of the fork server: its own session (a Ctrl-C at the terminal reaches the sweep,
    which decides), its output in `log`, the sweep's environment for it, and death with the server (which
    exits when the sweep does)."""
    server_pid = os.getppid()
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    _die_with_parent(server_pid)
    _die_with(sweep_pid)
    import torch

    if env.get("OMP_NUM_THREADS", "").isdigit():  # the server's thread pool was sized before the slot's share
        torch.set_num_threads(max(1, int(env["OMP_NUM_THREADS"])))
    code = train_trial(Path(config))
    atexit._run_exitfuncs()  # what an interpreter runs at its exit; a forked child ends with os._exit
    sys.exit(code)


def main(argv: list[str]) -> int:
    config, parent_pid = Path(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    return train_trial(config)


def train_trial(config: Path) -> int:
    """Train the trial's config; on failure record why for the study and return 1. The process's pid goes
    beside the config first: which process trains a trial is there to see (and to check that it ended)."""
    (Path(config).parent / TRAINER_PID_FILE).write_text(f"{os.getpid()}\n")
    from ..train import load_train_config, train

    try:
        result = train(load_train_config(config))
    except Exception as exc:  # recorded for the study, then the trial fails
        kind, message = classify_failure(exc)
        traceback.print_exc()
        out = Path(config).parent
        (out / ERROR_FILE).write_text(json.dumps({"kind": kind, "message": message}) + "\n")
        return 1
    print(f"trained {result.steps} steps; best {result.best_metric} at step {result.best_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
