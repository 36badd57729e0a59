"""The studio's pages and guards over HTTP (FastAPI's test client): what the runs list shows for finished,
failed, killed, corrupt and old-format folders, that the form holds every config field and refuses a bad value
with the CLI's message, and that traversal, foreign hosts, missing tokens and missing keys are refused.
tests/test_studio_browser.py drives the real app in a browser."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from deltatune.studio import create_app  # noqa: E402
from deltatune.studio.form import all_fields, raw_config  # noqa: E402
from deltatune.task.config import ConfigError, TrainConfig, validate_config  # noqa: E402


def _client(root, **kwargs) -> TestClient:
    return TestClient(create_app(root, **kwargs), base_url="http://127.0.0.1:7860")


def _token(client) -> str:
    return re.search(r'name="token" value="([^"]+)"', client.get("/launch").text).group(1)


def _record(folder, state, pid=None, error=None):
    pid = pid or 999_999_999  # no such process
    record = {"pid": pid, "pid_start": "1", "host": socket.gethostname(), "started": time.time(), "state": state,
              "error": error}  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))


def _run_folder(root, name, *, state=None, summary=None, config=None, error=None):
    folder = root / name
    folder.mkdir(parents=True)
    config = config or {"training": {"max_steps": 10, "objective": "sft"}, "adapter": {"method": "lora"},
                        "eval": {"metric": "loss"}}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if state:
        _record(folder, state, error=error)
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "split": "train", "loss": 2.0 / s}) + "\n" for s in range(1, 4))
    )
    return folder


def test_the_runs_list_shows_each_state_and_never_breaks_on_a_bad_folder(tmp_path):
    _run_folder(tmp_path, "done", state="finished", summary={"best_metric": 0.25, "steps": 10})
    _run_folder(tmp_path, "crashed", state="failed", error="NonFiniteLossError: loss is nan at step 3")
    _run_folder(tmp_path, "gone", state="running")  # its process is dead: killed outright
    _run_folder(tmp_path, "old", summary={"best_metric": 1.5, "steps": 10})  # before run.json existed
    corrupt = _run_folder(tmp_path, "group/corrupt")
    (corrupt / "config.yaml").write_text("training: [unclosed")
    (corrupt / "summary.json").write_text('{"best_metric": ')  # half-written
    (corrupt / "run.json").write_bytes(b"\xff\xfe")
    (tmp_path / "not-a-run").mkdir()
    client = _client(tmp_path)
    runs = {r["name"]: r for r in client.get("/api/runs").json()}
    assert set(runs) == {"done", "crashed", "gone", "old", "group/corrupt"}
    assert [runs[n]["status"] for n in ("done", "crashed", "gone", "old", "group/corrupt")] == [
        "finished", "failed", "killed", "finished", "unknown"
    ]  # fmt: skip
    assert runs["done"]["best_metric"] == 0.25 and runs["crashed"]["steps"] == 3
    assert runs["crashed"]["error"] == "NonFiniteLossError: loss is nan at step 3"
    problems = " | ".join(runs["group/corrupt"]["problems"])
    assert "config.yaml" in problems and "summary.json: " in problems and "run.json: " in problems
    page = client.get("/")
    assert page.status_code == 200 and "group/corrupt" in page.text and "not valid JSON" in page.text
    for name in runs:
        assert client.get(f"/runs/{name}").status_code == 200
    crashed = client.get("/runs/crashed").text
    assert "NonFiniteLossError: loss is nan at step 3" in crashed and 'id="resume"' in crashed
    assert (
        runs["old"]["notes"]
        == ["older format: no run.json (a deltatune from before it existed); status from summary.json"]
        and not runs["done"]["notes"]
    )


@pytest.mark.parametrize(
    ("provenance", "problem", "note", "written_by"),
    [
        ({"schema_version": 1, "environment": {"deltatune": "0.1.0"}}, None, None, "0.1.0"),
        ({"environment": {}}, None, "has no schema_version", None),
        ({"schema_version": 99}, "schema_version 99, newer than this deltatune reads (1)", None, None),
        ({"schema_version": "1"}, "schema_version '1', which is not a version number", None, None),
        ("{half", "adapter/deltatune.json: ", None, None),
    ],
)
def test_an_adapters_schema_shows_as_older_newer_or_unreadable(
    tmp_path, provenance, problem, note, written_by
):
    folder = _run_folder(tmp_path, "r", state="finished", summary={"steps": 3})
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    text = provenance if isinstance(provenance, str) else json.dumps(provenance)
    (folder / "adapter" / "deltatune.json").write_text(text)
    client = _client(tmp_path)
    (run,) = client.get("/api/runs").json()
    assert run["written_by"] == written_by
    assert (problem is None and not run["problems"]) or problem in " ".join(run["problems"])
    assert (note is None and not run["notes"]) or note in " ".join(run["notes"])
    page = client.get("/runs/r")
    assert page.status_code == 200 and (
        written_by is None or f"written by deltatune {written_by}" in page.text
    )


def test_metrics_come_in_complete_lines_from_an_offset(tmp_path):
    folder = _run_folder(tmp_path, "r", state="running")
    client = _client(tmp_path)
    first = client.get("/api/runs/r/metrics").json()
    assert [r["step"] for r in first["records"]] == [1, 2, 3]
    with (folder / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 4, "split": "train", "loss": 0.4}) + "\n" + '{"step": 5, "spl')
    more = client.get(f"/api/runs/r/metrics?offset={first['offset']}").json()
    assert [r["step"] for r in more["records"]] == [4]  # the line being written waits
    assert client.get(f"/api/runs/r/metrics?offset={more['offset']}").json()["records"] == []


@pytest.mark.parametrize(
    "path", ["/runs/../etc", "/runs/%2e%2e/%2e%2e/etc", "/api/runs/..%2F..%2Fetc/metrics", "/runs/%2Fetc"]
)
def test_paths_outside_the_runs_folder_are_refused(tmp_path, path):
    (tmp_path / "runs").mkdir()
    client = _client(tmp_path / "runs")
    response = client.get(path)
    assert response.status_code == 404
    assert "root:" not in response.text


def test_a_symlink_out_of_the_runs_folder_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.yaml").write_text("x: 1")
    os.symlink(tmp_path / "secret", tmp_path / "runs" / "link")
    client = _client(tmp_path / "runs")
    assert client.get("/runs/link").status_code == 404
    assert client.get("/api/runs").json() == []


def test_foreign_hosts_posts_without_the_token_and_missing_keys_are_refused(tmp_path):
    client = _client(tmp_path)
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 421  # DNS rebinding
    assert client.post("/launch", data={"output_dir": "x"}).status_code == 403  # a page elsewhere posting
    assert client.post("/runs/x/stop").status_code == 403
    keyed = _client(tmp_path, api_key="s3cret")
    assert keyed.get("/", follow_redirects=False).headers["location"] == "/login"
    assert keyed.get("/api/runs").status_code == 401
    assert keyed.get("/api/runs", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert keyed.post("/login", data={"key": "wrong"}).status_code == 401
    assert keyed.post("/login", data={"key": "s3cret"}, follow_redirects=False).status_code == 303
    assert keyed.get("/api/runs").status_code == 200  # the cookie /login set
    assert keyed.cookies.get("deltatune_studio") != "s3cret"  # the cookie is not the key


def _leaves(model, prefix=""):
    from deltatune.studio.form import _section_type

    for key, info in model.model_fields.items():
        section, _ = _section_type(info.annotation)
        if section is not None:
            yield from _leaves(section, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_the_form_has_every_config_field_and_reads_back_what_yaml_would(tmp_path):
    fields = all_fields()
    assert set(_leaves(TrainConfig)) <= set(fields)  # a field added to the config is in the form by itself
    page = _client(tmp_path).get("/launch").text
    assert all(f'name="{name}"' in page for name in fields)
    raw = raw_config({
        "model.path": "m", "data.train": "d.jsonl", "data.format": "instruction", "data.columns": "{label: s}",
        "adapter.method": "lora", "adapter.settings": "r: 4\nlora_alpha: 8\ntarget_modules: all-linear",
        "training.max_steps": "20", "training.gradient_checkpointing": "True", "optim.lr": "3e-3",
        "eval.generate_metrics": "[exact_match]", "report.to": "[tensorboard]", "output_dir": "r",
        "quantization.bits": "", "training.seed": "",
    })  # fmt: skip
    assert raw == {
        "model": {"path": "m"}, "data": {"train": "d.jsonl", "format": "instruction", "columns": {"label": "s"}},
        "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "training": {"max_steps": 20, "gradient_checkpointing": True}, "optim": {"lr": 3e-3},
        "eval": {"generate_metrics": ["exact_match"]}, "report": {"to": ["tensorboard"]}, "output_dir": "r",
    }  # fmt: skip
    assert validate_config(raw).training.max_steps == 20


def test_a_bad_value_is_refused_with_the_message_the_command_line_gives(tmp_path):
    client = _client(tmp_path)
    values = {"model.path": "m", "data.train": "d.jsonl", "data.format": "instruction",
              "adapter.settings": "r: 4\nlora_alpha: 8\ntarget_modules: all-linear",
              "training.max_steps": "-3", "output_dir": "bad"}  # fmt: skip
    response = client.post("/launch", data={**values, "token": _token(client)})
    assert response.status_code == 400
    raw = raw_config(values) | {"output_dir": str((tmp_path / "bad").resolve())}
    with pytest.raises(ConfigError) as cli:
        validate_config(raw, str((tmp_path / "bad" / "launch.yaml").resolve()))
    shown = re.search(r'<pre class="error" id="error">(.*?)</pre>', response.text, re.S).group(1)
    assert shown.replace("&#39;", "'").replace("&gt;", ">") == str(cli.value)
    assert "training.max_steps" in shown and not (tmp_path / "bad").exists()  # nothing written
    outside = client.post("/launch", data={**values, "training.max_steps": "3", "output_dir": "../x",
                                           "token": _token(client)})  # fmt: skip
    assert outside.status_code == 400 and "outside the studio" in outside.text
    absolute = client.post("/launch", data={**values, "training.max_steps": "3", "output_dir": "/tmp/x",
                                            "token": _token(client)})  # fmt: skip
    assert absolute.status_code == 400 and "outside the studio" in absolute.text


@pytest.mark.subprocess
@pytest.mark.slow
def test_stop_reaches_a_trainer_even_where_ctrl_c_was_ignored(tmp_path, tiny_causal_lm):
    """A studio started as a shell's background job ignores SIGINT, and so would the trainers it starts: they
    lead their own session, so they take SIGINT back (honour_interrupts) and the stop button works."""
    from train_helpers import causal_config, instruction_rows, write_jsonl

    config = causal_config(tiny_causal_lm, write_jsonl(tmp_path / "d.jsonl", instruction_rows(40, 0)), "run",
                           max_steps=100_000)  # fmt: skip
    config["eval"] = {"every": 100_000}
    script = f"""
import json, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `studio &` in a script leaves it
from deltatune.studio import launcher
root = Path({str(tmp_path / "runs")!r})
out = launcher.launch(root, json.loads({json.dumps(json.dumps(config))}))
while not (out / "metrics.jsonl").is_file():
    time.sleep(0.1)
assert launcher.stop(root, "run")
while launcher.live_writer(out):
    time.sleep(0.1)
print(json.loads((out / "run.json").read_text())["state"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip() == "killed", done.stderr
