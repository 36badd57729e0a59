"""Every command runs with only the extras it declares: its smallest case in an environment without the
others (tests/extras_env.py), and a command whose extra is missing says which one to install."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from extras_env import python_without
from serve_helpers import AUTH, running_server
from train_helpers import causal_config, instruction_rows, sentiment_rows, write_config, write_jsonl

pytestmark = pytest.mark.subprocess

# Runs each command line in turn in one process; prints one JSON line per command: its argv and exit code.
DRIVER = """
import contextlib, io, json, sys
from deltatune.cli.main import main
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    print(json.dumps({"argv": argv[0], "rc": rc, "stderr": err.getvalue()[-2000:]}), flush=True)
"""


def _run(python: Path, commands: list[list[str]]) -> list[dict]:
    done = subprocess.run(
        [str(python), "-c", DRIVER, json.dumps(commands)], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"argv"')]
    assert [row["argv"] for row in rows] == [argv[0] for argv in commands]
    return rows


@pytest.fixture(scope="module")
def work(tiny_causal_lm, tiny_bert, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("extras")
    data = write_jsonl(folder / "d.jsonl", instruction_rows(24, 0))
    causal = causal_config(tiny_causal_lm, data, folder / "run", max_steps=2, batch_size=4)
    causal["eval"] = {"every": 2}
    labels = write_jsonl(folder / "labels.jsonl", sentiment_rows(24, 0))
    classifier = {
        "model": {"path": str(tiny_bert), "task": "classification"},
        "data": {"format": "classification", "max_length": 16, "train": str(labels)},
        "adapter": {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
        "training": {"max_steps": 2, "batch_size": 4, "progress": False},
        "eval": {"every": 2, "metric": "accuracy"},
        "output_dir": str(folder / "classifier"),
    }
    corpus = folder / "general.txt"
    corpus.write_text("The river rose after the rain.\nA market opened in the old town square.\n")
    return {
        "folder": folder,
        "model": tiny_causal_lm,
        "bert": tiny_bert,
        "causal": write_config(folder / "causal.yaml", causal),
        "classifier": write_config(folder / "classifier.yaml", classifier),
        "quantized": write_config(
            folder / "quantized.yaml",
            {**causal, "quantization": {"bits": 4}, "output_dir": str(folder / "qrun")},
        ),
        "corpus": corpus,
        "reported": write_config(
            folder / "reported.yaml",
            {**causal, "report": {"to": ["wandb", "mlflow"]}, "output_dir": str(folder / "rrun")},
        ),
    }


def test_every_core_command_runs_without_any_extra(work, tmp_path):
    python = python_without(tmp_path / "env")
    model, folder = str(work["model"]), work["folder"]
    adapter = str(folder / "run" / "adapter")
    commands = [
        ["train", str(work["causal"])],
        ["eval", str(work["causal"]), "--adapter", adapter],
        ["generate", "--base", model, "--adapter", adapter, "--max-new-tokens", "3", "Say hi"],
        ["forgetting", "--base", model, "--adapter", adapter, "--corpus", str(work["corpus"]), "--texts", "2",
         "--max-tokens", "8", "--prompts", "1", "--new-tokens", "2", "--out", str(tmp_path / "forgetting")],
        ["compare", "--task", f"t={work['causal']}", "--adapter", f"a={adapter}", "--device", "cpu",
         "--out", str(tmp_path / "compare")],
        ["combine", "--base", model, "--out", str(tmp_path / "combined"), adapter, adapter],
        ["convert", "--base", model, "--adapter", adapter, "--out", str(tmp_path / "converted")],
        ["export", "--base", model, "--adapter", adapter, "--out", str(tmp_path / "merged")],
        ["inspect", adapter],
        ["bench", "--base", model, "--adapter", adapter, "--batch-sizes", "1", "--prompt-tokens", "4",
         "--new-tokens", "2", "--reps", "1", "--variants", "base", "quantized", "--out", str(tmp_path / "bench")],
        ["train", str(work["classifier"])],
        ["classify", "--base", str(work["bert"]), "--adapter", str(folder / "classifier" / "adapter"), "good day"],
        # the commands that need an extra say which one
        ["export", "--base", model, "--adapter", adapter, "--out", str(tmp_path / "m.gguf"), "--format", "gguf"],
        ["train", str(work["quantized"])],
        ["sweep", str(work["causal"]), "--space", str(work["causal"]), "--trials", "1"],
        ["serve", "--base", model, "--adapters-dir", str(folder)],
        ["train", str(work["reported"])],
        ["studio", "--runs", str(tmp_path / "studio-runs")],
    ]  # fmt: skip
    *core, gguf, quantized, sweep, serve, reported, studio = _run(python, commands)
    failed = {r["argv"]: r["stderr"] for r in core if r["rc"] != 0}
    assert not failed, failed
    assert gguf["rc"] != 0 and "pip install 'deltatune[models]'" in gguf["stderr"]
    assert quantized["rc"] != 0 and "pip install 'deltatune[quant]'" in quantized["stderr"]
    assert sweep["rc"] != 0 and "pip install 'deltatune[sweep]'" in sweep["stderr"]
    assert serve["rc"] != 0 and "pip install 'deltatune[serve]'" in serve["stderr"]
    assert (
        reported["rc"] != 0
        and "report.to: wandb needs wandb: pip install 'deltatune[wandb]'" in reported["stderr"]
    )
    assert not (folder / "rrun" / "config.yaml").exists()  # refused before anything was written
    assert studio["rc"] != 0 and "pip install 'deltatune[studio]'" in studio["stderr"]
    assert (tmp_path / "merged" / "config.json").exists() and (
        tmp_path / "forgetting" / "forgetting.json"
    ).exists()
    rows = json.loads((tmp_path / "bench" / "latency.json").read_text())["rows"]
    (skipped,) = [r for r in rows if r["variant"] == "quantized"]  # measured without it, and said why
    assert "pip install 'deltatune[quant]'" in skipped["skipped"]


def test_serve_runs_with_only_its_extra(work, tmp_path):
    python = python_without(tmp_path / "env", keep_extras=("serve",))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    with running_server(work["model"], adapters, python=python) as (_, url):
        models = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=60).json()
        assert [m["id"] for m in models["data"]] == ["base"]
        answer = httpx.post(
            f"{url}/v1/completions", headers=AUTH, timeout=600,
            json={"model": "base", "prompt": "Say hi", "max_tokens": 2},
        )  # fmt: skip
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


def test_sweep_runs_with_only_its_extra(work, tmp_path):
    python = python_without(tmp_path / "env", keep_extras=("sweep",))
    space = write_config(tmp_path / "space.yaml", {"optim.lr": {"float": [1e-3, 1e-2], "log": True}})
    out = tmp_path / "sweep"
    (sweep,) = _run(
        python, [["sweep", str(work["causal"]), "--space", str(space), "--trials", "1", "--out", str(out)]]
    )
    assert sweep["rc"] == 0, sweep["stderr"]
    assert json.loads((out / "trials.json").read_text())["counts"]["complete"] == 1
