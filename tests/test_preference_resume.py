"""A preference run survives what an SFT run survives, through the real command in subprocesses: killed with
SIGKILL and resumed it ends with the same adapter, bit for bit; two DDP ranks end where one process with twice
the gradient accumulation ends; a full fine-tune resumes against the reference it kept before step 1."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from test_preference import pair_rows
from test_resume_and_ddp import (
    TWO_RANKS,
    assert_same_adapter,
    kill_at_step_5_and_resume,
    metric_records,
    run_train,
)
from train_helpers import causal_config, write_config, write_jsonl

pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows(120, 7))


def make_config(tmp_path, model, data, name, objective="dpo", dropout=0.1, **training):
    raw = causal_config(model, data, tmp_path / name, max_steps=8, checkpoint_every=3, objective=objective,
                        **training)  # fmt: skip
    raw["data"]["format"] = "preference"
    raw["adapter"]["lora_dropout"] = dropout  # > 0 exercises the restored RNG state
    raw["eval"] = {"every": 4, "metric": "reward_accuracy"}
    return write_config(tmp_path / f"{name}.yaml", raw)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_killed_preference_run_resumes_to_the_same_adapter(tmp_path, tiny_causal_lm, pairs, objective):
    reference = make_config(tmp_path, tiny_causal_lm, pairs, "reference", objective)
    assert run_train(reference).returncode == 0
    crashed = make_config(tmp_path, tiny_causal_lm, pairs, "crashed", objective)
    kill_at_step_5_and_resume(crashed)
    assert_same_adapter(tmp_path / "reference", tmp_path / "crashed", tolerance=0)
    assert metric_records(tmp_path / "crashed") == metric_records(tmp_path / "reference")


@pytest.fixture(scope="module")
def single_dpo(tiny_causal_lm, pairs, tmp_path_factory) -> Path:
    """DPO in one process with twice the accumulation, no dropout: where DDP and FSDP ranks must end."""
    folder = tmp_path_factory.mktemp("single")
    config = make_config(folder, tiny_causal_lm, pairs, "single", dropout=0.0, grad_accum=2)
    assert run_train(config).returncode == 0
    return folder / "single"


def test_two_ddp_ranks_match_one_process_with_accumulation(tmp_path, tiny_causal_lm, pairs, single_dpo):
    ddp = make_config(tmp_path, tiny_causal_lm, pairs, "ddp", dropout=0.0)
    launcher = TWO_RANKS
    result = run_train(ddp, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each pair's prompt runs once per answer in this run: DDP" in result.stderr
    assert_same_adapter(single_dpo, tmp_path / "ddp")


def test_a_full_fine_tune_resumes_against_the_reference_it_kept(tmp_path, tiny_causal_lm, pairs):
    def full(name):
        raw = causal_config(
            tiny_causal_lm, pairs, tmp_path / name, max_steps=6, checkpoint_every=2, objective="dpo"
        )
        raw["data"]["format"] = "preference"
        raw["adapter"] = {"method": "full"}
        raw["optim"]["lr"] = 1e-3
        raw["eval"] = {"every": 3, "metric": "reward_accuracy"}
        return write_config(tmp_path / f"{name}.yaml", raw)

    assert run_train(full("reference")).returncode == 0
    crashed = full("crashed")
    assert run_train(crashed, fault="step:3").returncode == -signal.SIGKILL
    kept = (tmp_path / "crashed" / "reference_logps.safetensors").read_bytes()
    resumed = run_train(crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "scoring every pair with the base once" not in resumed.stderr  # read back, not recomputed
    assert (tmp_path / "crashed" / "reference_logps.safetensors").read_bytes() == kept
    assert metric_records(tmp_path / "crashed") == metric_records(tmp_path / "reference")


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_two_fsdp_ranks_match_one_process(tmp_path, tiny_causal_lm, pairs, objective, request):
    """FSDP2 shards the model; the reference (adapters off) runs on the sharded model too."""
    data = pairs
    if objective == "kto":
        from test_preference import kto_rows

        data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(120, 8))

    def make(name, **training):
        path = make_config(tmp_path, tiny_causal_lm, data, name, objective, dropout=0.0, **training)
        raw = __import__("yaml").safe_load(path.read_text())
        raw["data"]["format"] = "unpaired_preference" if objective == "kto" else "preference"
        return write_config(path, raw)

    if objective == "dpo":  # the same run as the DDP test's reference
        single = request.getfixturevalue("single_dpo")
    else:
        assert run_train(make("single", grad_accum=2)).returncode == 0
        single = tmp_path / "single"
    launcher = TWO_RANKS
    result = run_train(make("fsdp", distributed="fsdp"), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(single, tmp_path / "fsdp")
