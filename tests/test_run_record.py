"""run.json: who writes a run folder and how the run ended; a second writer is refused while the first lives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deltatune.train.run_record import RunInUseError, claim_run, process_start, read_run_record, writer_alive


def test_a_run_is_running_then_finished(tmp_path):
    with claim_run(tmp_path, True):
        record = read_run_record(tmp_path)
        assert record["state"] == "running" and record["pid"] == os.getpid() and writer_alive(record)
    record = read_run_record(tmp_path)
    assert record["state"] == "finished" and record["ended"] >= record["started"] and record["error"] is None


@pytest.mark.parametrize(
    ("error", "state"), [(ValueError("bad lr"), "failed"), (KeyboardInterrupt(), "killed")]
)
def test_how_a_run_ended_is_recorded(tmp_path, error, state):
    with pytest.raises(type(error)), claim_run(tmp_path, True):
        raise error
    record = read_run_record(tmp_path)
    assert record["state"] == state
    assert record["error"] == ("ValueError: bad lr" if state == "failed" else "KeyboardInterrupt")


def test_a_second_writer_is_refused_while_the_first_lives_and_welcome_after(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        record = {"pid": child.pid, "pid_start": process_start(child.pid), "host": os.uname().nodename,
                  "started": 0.0, "state": "running"}  # fmt: skip
        (tmp_path / "run.json").write_text(json.dumps(record))
        refused = pytest.raises(RunInUseError, match=rf"being written by another run \(pid {child.pid}")
        with refused, claim_run(tmp_path, True):
            pass
        assert json.loads((tmp_path / "run.json").read_text()) == record  # the live run's record is untouched
    finally:
        child.communicate(b"")
    assert not writer_alive(record)  # its process is gone: the folder is free (a killed run, resumable)
    with claim_run(tmp_path, True):
        pass
    assert read_run_record(tmp_path)["state"] == "finished"


def test_a_reused_pid_is_not_the_writer(tmp_path):
    record = {"pid": os.getpid(), "pid_start": "1", "host": os.uname().nodename, "state": "running"}
    assert not writer_alive(record)  # same pid, another start time: another process


def test_a_corrupt_record_is_replaced_not_trusted(tmp_path):
    (tmp_path / "run.json").write_text('{"pid": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_run_record(tmp_path)
    with claim_run(tmp_path, True):
        pass
    assert read_run_record(tmp_path)["state"] == "finished"
