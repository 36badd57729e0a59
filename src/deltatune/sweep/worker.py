"""The process one trial runs in: `python -m deltatune.sweep.worker CONFIG.yaml PARENT_PID`.

It is `deltatune train` plus two things a sweep needs. It dies with the sweep (Linux: PR_SET_PDEATHSIG), so a
sweep killed with SIGKILL leaves no orphan trainer writing into a trial folder. And it records why it failed in
`trial_error.json` (diverged, out of memory, or the error itself), so the study stores a reason, not a log.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import traceback
from pathlib import Path

ERROR_FILE = "trial_error.json"
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the sweep terminates its children itself when it can
        pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """(kind, message) for the study: 'diverged', 'out_of_memory' or 'error'."""
    from ..train import NonFiniteLossError

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, NonFiniteLossError):
        return "diverged", str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or "can't allocate" in str(exc):
        return "out_of_memory", text
    return "error", text


def main(argv: list[str]) -> int:
    config, parent_pid = Path(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
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
