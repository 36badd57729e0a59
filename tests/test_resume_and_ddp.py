"""Crash safety and multi-process training, through the real `deltatune` command in subprocesses:
- a run killed with SIGKILL (mid-training, or mid-checkpoint-write) and resumed ends with the same adapter,
  bit for bit, as an uninterrupted run with the same seed;
- `torchrun --nproc_per_node 2` (DDP over gloo) matches one process with twice the gradient accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import causal_config, instruction_rows, write_config, write_jsonl

pytestmark = pytest.mark.subprocess
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_train(config: Path, *args: str, fault: str | None = None, launcher: list[str] | None = None):
    env = dict(ENV, DELTATUNE_FAULT=fault) if fault else ENV
    command = [*(launcher or [sys.executable, "-m", "deltatune"]), "train", str(config), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)


def adapter_tensors(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


# two DDP (or FSDP) ranks of the real command on this machine
TWO_RANKS = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "deltatune",
]


def assert_same_adapter(want_run: Path, got_run: Path, tolerance: float = 1e-5) -> None:
    """Two runs' adapters hold the same tensors, each within `tolerance` (0: bit for bit)."""
    want, got = adapter_tensors(want_run), adapter_tensors(got_run)
    assert want.keys() == got.keys() and want
    for key in want:
        if tolerance:
            assert (want[key] - got[key]).abs().max() < tolerance, key
        else:
            assert want[key].equal(got[key]), key


def kill_at_step_5_and_resume(config: Path, run=run_train) -> None:
    """SIGKILL the run at step 5 (checkpoints every 3 steps), resume it, and check it resumed from step 3."""
    killed = run(config, fault="step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run(config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step-00000003 (step 3)" in resumed.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_rows(120, 3))


def make_config(tmp_path: Path, model: Path, data: Path, name: str, dropout: float = 0.1, **training) -> Path:
    raw = causal_config(model, data, tmp_path / name, max_steps=9, checkpoint_every=3, **training)
    raw["adapter"]["lora_dropout"] = dropout  # > 0 exercises the restored RNG state
    raw["eval"]["every"] = 3
    return write_config(tmp_path / f"{name}.yaml", raw)


@pytest.fixture(scope="module")
def reference(tiny_causal_lm, data, tmp_path_factory) -> Path:
    """The uninterrupted run every killed-and-resumed one must end at (trained once for the module)."""
    folder = tmp_path_factory.mktemp("reference")
    assert run_train(make_config(folder, tiny_causal_lm, data, "reference")).returncode == 0
    return folder / "reference"


@pytest.fixture(scope="module")
def single(tiny_causal_lm, data, tmp_path_factory) -> Path:
    """One process with twice the accumulation and no dropout: where two ranks must end (trained once)."""
    folder = tmp_path_factory.mktemp("single")
    config = make_config(folder, tiny_causal_lm, data, "single", dropout=0.0, grad_accum=2)
    assert run_train(config).returncode == 0
    return folder / "single"


@pytest.mark.parametrize("fault", ["step:5", "checkpoint:6"])
def test_killed_run_resumes_to_the_same_adapter(tmp_path, tiny_causal_lm, data, fault, reference):
    crashed = make_config(tmp_path, tiny_causal_lm, data, "crashed")
    killed = run_train(crashed, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = sorted(p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir())
    # Killed after step 5: checkpoints 3 exists. Killed while writing 6: 3 exists, 6 only as a hidden staging dir.
    assert [c for c in checkpoints if not c.startswith(".")] == ["step-00000003"]
    again = run_train(crashed)  # without --resume: refuses to overwrite the run
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = run_train(crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step-00000003 (step 3)" in resumed.stderr
    assert not [p for p in (tmp_path / "crashed" / "checkpoints").iterdir() if p.name.startswith(".")]
    want, got = adapter_tensors(reference), adapter_tensors(tmp_path / "crashed")
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].equal(got[key]), key
    assert metric_records(tmp_path / "crashed") == metric_records(reference)


def metric_records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field: a resumed run logs each step exactly once, same values."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_resume_refuses_a_different_config(tmp_path, tiny_causal_lm, data):
    config = make_config(tmp_path, tiny_causal_lm, data, "run")
    assert run_train(config, fault="step:4").returncode == -signal.SIGKILL
    changed = run_train(config, "--resume", "optim.lr=0.1")
    assert changed.returncode == 2
    assert "differs from the run's (optim.lr)" in changed.stderr


def test_two_process_ddp_matches_one_process_with_accumulation(tmp_path, tiny_causal_lm, data, single):
    # No dropout: ranks draw their masks from identical RNG streams, one process from one stream.
    ddp = make_config(tmp_path, tiny_causal_lm, data, "ddp", dropout=0.0)
    launcher = TWO_RANKS
    result = run_train(ddp, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved:") == 1  # only rank 0 reports and writes
    want, got = adapter_tensors(single), adapter_tensors(tmp_path / "ddp")
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        assert got[key].abs().sum() > 0 or "lora_B" not in key
        assert (want[key] - got[key]).abs().max() < 1e-5, key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_gradient_checkpointing_matches_one_process(tmp_path, tiny_causal_lm, data):
    """trl#4782: DDP with gradient checkpointing crashed with "mark a variable ready only once" (reentrant
    checkpointing fires DDP's gradient hooks a second time in the recomputation). deltatune checkpoints
    non-reentrantly (train.setup), so it trains and ends where one process with checkpointing and twice the
    accumulation ends."""
    single = make_config(tmp_path, tiny_causal_lm, data, "single", dropout=0.0, grad_accum=2,
                         gradient_checkpointing=True)  # fmt: skip
    assert run_train(single).returncode == 0
    ddp = make_config(tmp_path, tiny_causal_lm, data, "ddp", dropout=0.0, gradient_checkpointing=True)
    launcher = TWO_RANKS
    result = run_train(ddp, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = adapter_tensors(tmp_path / "single"), adapter_tensors(tmp_path / "ddp")
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        assert (want[key] - got[key]).abs().max() < 1e-5, key


def test_two_nodes_on_localhost_match_one_process(tmp_path, tiny_causal_lm, data, single):
    """Multi-node as on a cluster: two torchrun launches (`--nnodes 2 --node_rank 0|1`) meeting through the
    c10d rendezvous, one process each, end where one process with twice the accumulation ends."""
    nodes = make_config(tmp_path, tiny_causal_lm, data, "nodes", dropout=0.0)
    port = _free_port()
    launches = []
    for node_rank in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", "deltatune-test", "-m", "deltatune", "train", str(nodes),
        ]  # fmt: skip
        launches.append(
            subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=1800) for p in launches]
    for process, (_, err) in zip(launches, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert sum(out.count("saved:") for out, _ in outputs) == 1  # the global rank 0 alone writes
    want, got = adapter_tensors(single), adapter_tensors(tmp_path / "nodes")
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        assert (want[key] - got[key]).abs().max() < 1e-5, key
