"""The warning that torch's threads will fight other processes for the cores."""

from __future__ import annotations

import pytest

from deltatune.core.threads import oversubscription


@pytest.mark.parametrize(
    ("threads", "load", "cores", "warned"),
    [
        (2, 3.1, 2, True),  # another run keeps both cores busy
        (2, 1.0, 2, False),  # only this process
        (1, 6.0, 2, False),  # one thread cannot oversubscribe
        (16, 4.0, 16, False),  # a big machine with room
        (16, 17.0, 16, True),
    ],
)
def test_warns_only_when_other_work_keeps_the_cores_busy(monkeypatch, threads, load, cores, warned):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    message = oversubscription(threads, load=load, cores=cores)
    assert (message is not None) == warned
    if warned:
        assert f"on {cores} cores" in message and "OMP_NUM_THREADS=" in message


def test_a_thread_count_the_user_set_is_taken_as_meant(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert oversubscription(2, load=9.0, cores=2) is None
