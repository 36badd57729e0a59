"""A GRPO run survives what an SFT run survives, through the real command in subprocesses: killed with SIGKILL
mid-run and resumed, it samples the completions the uninterrupted run sampled (each completion's seed is a
function of the run's seed, the step and the row: no generator state to lose) and ends with the same adapter,
bit for bit; two DDP ranks, each sampling its own prompts, end where one process with twice the gradient
accumulation ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_resume_and_ddp import (
    ENV,
    TWO_RANKS,
    assert_same_adapter,
    kill_at_step_5_and_resume,
    metric_records,
)
from train_helpers import causal_config, instruction_rows, write_config, write_jsonl

pytestmark = pytest.mark.subprocess
TESTS = str(Path(__file__).parent)


def run_train(config: Path, *args: str, fault: str | None = None, launcher: list[str] | None = None):
    """The command, with this folder on the path (the rewards live in grpo_rewards.py)."""
    env = dict(ENV, PYTHONPATH=os.pathsep.join(filter(None, [TESTS, ENV.get("PYTHONPATH")])))
    if fault:
        env["DELTATUNE_FAULT"] = fault
    command = [*(launcher or [sys.executable, "-m", "deltatune"]), "train", str(config), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", instruction_rows(60, 9))


def make_config(tmp_path, model, data, name, **training):
    settings = {"num_generations": 4, "max_completion_length": 5, "rewards": ["grpo_rewards:even_tokens"],
                "max_steps": 7, "batch_size": 2, "checkpoint_every": 3, "beta": 0.1} | training  # fmt: skip
    raw = causal_config(model, data, tmp_path / name, objective="grpo", **settings)
    raw["optim"]["lr"] = 3e-2
    raw["eval"] = {"every": 4, "generate_samples": 6, "max_new_tokens": 5}
    return write_config(tmp_path / f"{name}.yaml", raw)


def test_a_killed_grpo_run_resumes_to_the_same_samples_and_adapter(tmp_path, tiny_causal_lm, prompts):
    reference = make_config(tmp_path, tiny_causal_lm, prompts, "reference")
    done = run_train(reference)
    assert done.returncode == 0, done.stderr[-2000:]
    crashed = make_config(tmp_path, tiny_causal_lm, prompts, "crashed")
    kill_at_step_5_and_resume(crashed, run_train)
    assert_same_adapter(tmp_path / "reference", tmp_path / "crashed", tolerance=0)
    # every step's rewards, lengths and KL: the resumed steps 4 to 7 sampled what the reference sampled
    records = metric_records(tmp_path / "crashed")
    assert records == metric_records(tmp_path / "reference")
    assert len({r["reward"] for r in records if r["split"] == "train"}) > 1


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_two_ddp_ranks_match_one_process_with_accumulation(tmp_path, tiny_causal_lm, prompts, scale):
    """scale_rewards batch: the rewards' std over every rank's samples, as one process sees them."""
    single = make_config(
        tmp_path, tiny_causal_lm, prompts, "single", grad_accum=2, max_steps=3, scale_rewards=scale
    )
    done = run_train(single)
    assert done.returncode == 0, done.stderr[-2000:]
    ddp = make_config(tmp_path, tiny_causal_lm, prompts, "ddp", max_steps=3, scale_rewards=scale)
    launcher = TWO_RANKS
    result = run_train(ddp, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each completion runs with its prompt (not the prompt once per group): DDP" in result.stderr
    assert_same_adapter(tmp_path / "single", tmp_path / "ddp")


def test_a_sweep_searches_grpo_settings_and_keeps_the_best_reward(tmp_path, tiny_causal_lm, prompts):
    from deltatune.cli.main import main

    raw = causal_config(tiny_causal_lm, prompts, tmp_path / "run", objective="grpo", num_generations=2,
                        max_completion_length=4, max_steps=2, batch_size=2,
                        rewards=[{"name": "length_penalty", "options": {"max_tokens": 4, "soft_tokens": 3}}])  # fmt: skip
    raw["eval"] = {"every": 2, "generate_samples": 4, "max_new_tokens": 4}
    base = write_config(tmp_path / "base.yaml", raw)
    space = write_config(tmp_path / "space.yaml", {"training.beta": {"choices": [0.0, 0.2]},
                                                   "training.loss_type": {"choices": ["grpo", "dr_grpo"]}})  # fmt: skip
    out = tmp_path / "sweep"
    assert main(["sweep", str(base), "--space", str(space), "--trials", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "trials.json").read_text())["trials"]
    assert [r["state"] for r in rows] == ["complete"] * 2
    for row in rows:
        trained = json.loads((Path(row["trial_dir"]) / "summary.json").read_text())
        assert row["metric"] == trained["best_metric"] == trained["validation"]["reward"]
        config = json.loads((Path(row["adapter_dir"]) / "deltatune.json").read_text())["training_config"]
        assert config["objective"]["settings"]["loss_type"] == row["params"]["training.loss_type"]
