"""Whether torch's CPU threads will fight other processes for the cores.

torch runs one thread per core. Two processes doing that on two cores measured a training step 10x slower
than each with one thread: the threads of one wait at every barrier for a core the other holds. A process
cannot see its neighbours' thread counts, but the load average shows the cores are already busy.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def oversubscription(threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when `threads` more threads (torch's, beyond this process's first) land on cores that other
    work already keeps busy (`load`: the 1-minute load average, `cores`: those this process may use), else
    None. Settings the user made (OMP_NUM_THREADS) are taken as meant."""
    if threads <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = cores or usable_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available here
            return None
    others = load - 1  # this process is starting, and counts about one
    if others < cores - 0.5:
        return None
    return (
        f"the machine's load is {load:.1f} on {cores} cores and torch will run {threads} threads: processes "
        f"that share cores run each step several times slower (10x measured with two runs on two cores). Give "
        f"each process its share, e.g. OMP_NUM_THREADS={max(1, cores // 2)} for two runs at once"
    )
