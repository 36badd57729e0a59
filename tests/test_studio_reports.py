"""The studio's report pages and report jobs over HTTP (FastAPI's test client): the compare matrix shaded as
heatmaps (the best entry darkest per task, whichever way its metric runs; the change against the base from red
through white to blue), the sweep's trials with its Pareto front and links to the trial runs, a corrupt
report shown as such, pictures served only by their names, and the forms' refusals and command lines.
tests/test_studio_browser.py starts a compare from the form and opens its heatmap in a real browser."""

from __future__ import annotations

import html
import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from deltatune.studio import create_app, jobs  # noqa: E402
from deltatune.studio.reports import compare_heatmaps, find_reports  # noqa: E402
from deltatune.train.run_record import process_start  # noqa: E402

GUARD_S = 600  # hang guard only
# a stand-in for a report command: Ctrl-C ends it even where the test runner ignores SIGINT (a background job)
SLEEPER = "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); time.sleep(600)"

COMPARE = {
    "tasks": {"json": {"metric": "json_valid", "higher_is_better": True}, "word": {"metric": "loss", "higher_is_better": False}},
    "entries": ["base", "good", "bad"],
    "headline": {"base": {"json": 0.5, "word": 2.0}, "good": {"json": 0.9, "word": 1.0}, "bad": {"json": 0.1, "word": None}},
    "gain_vs_base": {"base": {"json": 0.0, "word": -0.0}, "good": {"json": 0.4, "word": 1.0}, "bad": {"json": -0.4, "word": None}},
    "cells": {"base": {}, "good": {}, "bad": {"word": {"error": "CUDA out of memory"}}},
    "reusability": {"good": {"own_task": "json", "mean_gain_off_task": {"loss": 1.0}, "tasks_counted": {"loss": 1}}},
    "provenance": {"deltatune": "test"},
}  # fmt: skip


def _client(root) -> TestClient:
    return TestClient(create_app(root), base_url="http://127.0.0.1:7860")


def _write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data) if not isinstance(data, str) else data)


def _cells(html: str, table: str) -> dict[str, list[tuple[str, str]]]:
    """entry -> [(class, text)] of the table's cells."""
    body = html.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr data-entry="([^"]+)">(.*?)</tr>', body, flags=re.S)
    return {e: re.findall(r'<td class="heat ([^"]+)"[^>]*>([^<]*)</td>', row) for e, row in rows}


def test_compare_heatmaps_shade_best_darkest_whichever_way_the_metric_runs(tmp_path):
    _write(tmp_path / "cmp", "compare.json", COMPARE)
    page = _client(tmp_path).get("/reports/cmp").text
    headline, gain = _cells(page, "heatmap-headline"), _cells(page, "heatmap-gain")
    assert headline["good"] == [("b10", "0.9"), ("b10", "1")]  # the highest json_valid, the lowest loss
    assert headline["bad"][0] == ("b0", "0.1") and headline["base"] == [("b5", "0.5"), ("b0", "2")]
    assert headline["bad"][1][0] == "none" and 'title="CUDA out of memory"' in page  # an error cell says why
    assert gain["base"] == [("b5", "+0"), ("b5", "+0")] and gain["good"] == [("b10", "+0.4"), ("b10", "+1")]
    assert gain["bad"][0] == ("b0", "-0.4")
    assert compare_heatmaps({})["headline"] == []  # an empty report draws nothing and breaks nothing


def test_the_reports_list_finds_each_kind_and_never_breaks_on_a_bad_one(tmp_path):
    _write(tmp_path / "a" / "cmp", "compare.json", COMPARE)
    _write(tmp_path / "forget", "forgetting.json", "{not json")
    _write(tmp_path / "lat", "latency.json", {"rows": [], "provenance": {}})
    _write(tmp_path / "sw", "trials.json", {"trials": []})
    _write(tmp_path / "run", "config.yaml", "model: {path: x}\n")
    _write(tmp_path / "run" / "inner", "compare.json", COMPARE)  # inside a run folder: not looked into
    found = {r.name: r.kind for r in find_reports(tmp_path)}
    assert found == {"a/cmp": "compare", "forget": "forgetting", "lat": "latency", "sw": "sweep"}
    client = _client(tmp_path)
    listing = client.get("/reports")
    assert listing.status_code == 200 and all(f'data-report="{name}"' in listing.text for name in found)
    broken = client.get("/reports/forget")
    assert broken.status_code == 200 and "forgetting.json could not be read as a JSON object" in broken.text
    assert client.get("/reports/run").status_code == 404


def test_pictures_are_served_by_name_only(tmp_path):
    _write(tmp_path / "cmp", "compare.json", COMPARE)
    (tmp_path / "cmp" / "compare.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "cmp" / "compare.md").write_text("# secret-ish")
    client = _client(tmp_path)
    assert client.get("/reports/cmp/pictures/compare.png").content == b"\x89PNG fake"
    assert '<img src="/reports/cmp/pictures/compare.png"' in client.get("/reports/cmp").text
    for bad in ("compare.md", "..%2F..%2Fetc%2Fpasswd", "front.png"):
        assert client.get(f"/reports/cmp/pictures/{bad}").status_code == 404
    assert client.get("/reports/..%2F..%2Fetc/pictures/compare.png").status_code == 404


def test_the_sweep_page_marks_the_front_and_links_each_trial_run(tmp_path):
    trial_dir = tmp_path / "sw" / "trials" / "0001"
    _write(trial_dir, "config.yaml", "model: {path: x}\n")
    trials = [
        {"number": 0, "state": "complete", "metric": 0.7, "params": {"optim.lr": 0.001234, "adapter.r": 4},
         "adapter_bytes": 2048, "trainable_params": 100, "s_per_step": 0.5, "trial_dir": str(tmp_path / "gone")},
        {"number": 1, "state": "complete", "metric": 0.8, "params": {"optim.lr": 0.01, "adapter.r": 8},
         "adapter_bytes": 4096, "trainable_params": 200, "s_per_step": 0.6, "trial_dir": str(trial_dir)},
        {"number": 2, "state": "pruned", "metric": None, "params": {"optim.lr": 0.1, "adapter.r": 2},
         "reason": "pruned at step 20", "trial_dir": "/elsewhere/0002"},
    ]  # fmt: skip
    data = {"study": "s", "metric": "accuracy", "mode": "max", "best_trial": 1, "pareto_front": [0, 1],
            "best_rule": "the rule", "counts": {"complete": 2, "pruned": 1}, "trials_asked": 3, "trials": trials}  # fmt: skip
    _write(tmp_path / "sw", "trials.json", data)
    page = _client(tmp_path).get("/reports/sw").text
    rows = dict(re.findall(r'<tr data-trial="(\d)" class="([^"]*)">', page))
    assert rows == {"0": "front", "1": "front best", "2": ""}
    assert '<a href="/runs/sw/trials/0001">1</a>' in page and 'href="/runs/gone"' not in page
    assert "0.00123" in page and "pruned at step 20" in page and '<span id="best-trial">1</span>' in page


def _run_with_adapter(root, name, base="tiny-base"):
    _write(root / name, "config.yaml", f"model: {{path: {base}}}\n")
    _write(root / name / "adapter", "adapter_config.json", "{}")


def test_forms_turn_into_the_commands_a_terminal_would_run(tmp_path):
    _run_with_adapter(tmp_path, "g/r1")
    _run_with_adapter(tmp_path, "r2", base="other-base")
    out = tmp_path / "o"
    compare = jobs.command_for(tmp_path, "compare", {"tasks": "a=t1.yaml\n\n t2.yaml ", "runs_1": "g/r1",
                                                     "adapters": "x=/some/adapter", "no_base": "1"}, out)  # fmt: skip
    assert compare == ["compare", "--task", "a=t1.yaml", "--task", "t2.yaml", "--adapter",
                       f"g-r1={tmp_path / 'g/r1/adapter'}", "--adapter", "x=/some/adapter", "--no-base"]  # fmt: skip
    forgetting = jobs.command_for(tmp_path, "forgetting", {"run": "r2", "texts": "8", "prompts": ""}, out)
    assert forgetting == [
        "forgetting",
        "--base",
        "other-base",
        "--adapter",
        str(tmp_path / "r2/adapter"),
        "--texts",
        "8",
    ]
    latency = jobs.command_for(
        tmp_path, "latency", {"run": "r2", "base": "b", "batch_sizes": "1 4", "reps": "2"}, out
    )
    assert latency == ["bench", "--base", "b", "--adapter", str(tmp_path / "r2/adapter"), "--reps", "2",
                       "--batch-sizes", "1", "4"]  # fmt: skip
    sweep = jobs.command_for(tmp_path, "sweep", {"config": "c.yaml", "space": "s.yaml", "trials": "3"}, out)
    assert sweep == ["sweep", "c.yaml", "--space", "s.yaml", "--trials", "3"]


@pytest.mark.parametrize(
    ("kind", "form", "needle"),
    [
        ("compare", {"out": "o", "runs_1": "g/r1"}, "tasks: give at least one training config"),
        ("compare", {"out": "o", "tasks": "t.yaml"}, "adapters: tick a run or give an adapter folder"),
        ("compare", {"out": "o", "tasks": "t.yaml", "runs_1": "bare"}, "run 'bare' has no adapter yet"),
        ("forgetting", {"out": "o"}, "run: pick the run whose adapter to measure"),
        ("latency", {"out": "../o", "run": "g/r1"}, "out: '../o' leads outside"),
        ("sweep", {"out": "o", "config": "c.yaml", "space": "s.yaml"}, "trials: how many trials"),
        ("forgetting", {"out": "g/r1", "run": "g/r1"}, "out: g/r1 already holds other files"),
        (
            "compare",
            {"tasks": "t.yaml", "runs_1": "g/r1"},
            "out: name the folder (under the studio's runs folder)",
        ),
    ],
)
def test_a_form_that_cannot_start_says_what_to_change(tmp_path, kind, form, needle):
    _run_with_adapter(tmp_path, "g/r1")
    _write(tmp_path / "bare", "config.yaml", "model: {path: x}\n")
    client = _client(tmp_path)
    token = re.search(r'name="token" value="([^"]+)"', client.get(f"/reports/new/{kind}").text)[1]
    reply = client.post(f"/reports/new/{kind}", data=form | {"token": token}, follow_redirects=False)
    assert reply.status_code == 400 and needle in html.unescape(reply.text)
    assert not (tmp_path / jobs.JOBS).exists()  # nothing started
    assert client.get("/reports/new/nope").status_code == 404


@pytest.mark.subprocess
def test_a_job_that_fails_shows_the_commands_own_message(tmp_path):
    _run_with_adapter(tmp_path, "r")
    client = _client(tmp_path)
    token = re.search(r'name="token" value="([^"]+)"', client.get("/reports/new/compare").text)[1]
    form = {"tasks": str(tmp_path / "missing.yaml"), "runs_1": "r", "out": "reports/c", "token": token}
    reply = client.post("/reports/new/compare", data=form, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/jobs/reports/c"
    deadline = time.monotonic() + GUARD_S
    while (job := client.get("/api/jobs/reports/c").json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["status"] == "failed" and "missing.yaml" in job["log"]
    assert not (tmp_path / "reports" / "c").exists()  # the command wrote nothing
    page = client.get("/jobs/reports/c").text
    assert f"deltatune compare --task {tmp_path / 'missing.yaml'}" in page and sys.executable not in page
    listing = client.get("/reports").text
    assert 'data-job="reports/c"' in listing and "failed" in listing


@pytest.mark.subprocess
def test_a_running_job_refuses_a_second_into_its_folder_and_stops_on_request(tmp_path):
    _run_with_adapter(tmp_path, "r")
    sleeper = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    try:
        folder = tmp_path / jobs.JOBS / "busy"
        folder.mkdir(parents=True)
        record = {"kind": "compare", "out": "busy", "command": ["deltatune", "compare"], "pid": sleeper.pid,
                  "pid_start": process_start(sleeper.pid), "host": socket.gethostname(), "started": time.time()}  # fmt: skip
        (folder / "job.json").write_text(json.dumps(record))
        client = _client(tmp_path)
        assert client.get("/api/jobs/busy").json()["status"] == "running"
        token = re.search(r'name="token" value="([^"]+)"', client.get("/jobs/busy").text)[1]
        form = {"tasks": "t.yaml", "runs_1": "r", "out": "busy", "token": token}
        refused = client.post("/reports/new/compare", data=form)
        assert refused.status_code == 400 and "a compare job is still writing busy" in refused.text
        assert (
            client.post("/jobs/busy/stop", data={"token": token}, follow_redirects=False).status_code == 303
        )
        assert sleeper.wait(timeout=GUARD_S) == -signal.SIGINT
        assert client.get("/api/jobs/busy").json()["status"] == "failed"  # it wrote no report
    finally:
        sleeper.kill()
