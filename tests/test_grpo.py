"""GRPO on the tiny model: the config and data checks (each with the error that names the problem and the
fix), rewards that raise or return what cannot be trained on (the run stops, naming the reward and the row,
before any update), the built-in rewards, learning a dense reward, seeded reproducibility, gradient
accumulation, the fallback to transformers' generate for adapters the engine cannot batch, and `eval`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import causal_config, instruction_rows, write_jsonl

from deltatune.data.readers import DataError
from deltatune.task.rewards import RewardError, json_match, json_valid, length_penalty, regex
from deltatune.train import ConfigError, evaluate_adapter, train, validate_config

EVEN = {"name": "grpo_rewards:even_tokens"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = instruction_rows(48, 5)
    for i, row in enumerate(rows):
        if i % 2 == 0:
            row["topic"] = "good"
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl", rows)


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))


def grpo_config(model, data, out, **training) -> dict:
    settings = {"num_generations": 4, "max_completion_length": 6, "rewards": [EVEN], "max_steps": 6,
                "batch_size": 2} | training  # fmt: skip
    raw = causal_config(model, data, out, objective="grpo", **settings)
    raw["optim"]["lr"] = 3e-2
    raw["eval"] = {"every": 3, "generate_samples": 8, "max_new_tokens": 6, "generate_metrics": ["json_valid"]}
    return raw


# --- config and data ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("training", "message"),
    [
        (
            {"rewards": ["json_mtch"]},
            "unknown reward 'json_mtch'; the built-ins are ['exact_match', 'json_match'",
        ),
        ({"rewards": None}, "training.objective=grpo needs training.rewards"),
        ({"num_generations": 1}, "training.num_generations=1 leaves no group to normalise"),
        (
            {"max_completion_length": 64},
            "training.max_completion_length=64 leaves no room for a prompt under data.max_length=64",
        ),  # fmt: skip
        (
            {"loss_type": "sigmoid"},
            "training.loss_type=sigmoid is not a loss of objective grpo; choose one of "
            "['grpo', 'bnpo', 'dr_grpo', 'dapo']",
        ),  # fmt: skip
        ({"distributed": "fsdp"}, "every FSDP forward is a collective"),
        (
            {"rewards": [{"name": "regex", "options": {"patern": "x"}}]},
            "reward 'regex' takes no option ['patern']",
        ),
        ({"rewards": ["grpo_rewards:missing"]}, "module 'grpo_rewards' has no function 'missing'"),
        ({"rewards": ["json_match", "json_match"]}, "name one reward twice"),
    ],
)
def test_a_bad_grpo_config_names_the_problem(tiny_causal_lm, prompts, tmp_path, training, message):
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", **training)
    with pytest.raises(ConfigError, match="") as caught:
        validate_config(raw)
    assert message in str(caught.value)


def test_a_reward_module_that_fails_to_import_stops_before_any_model_loads(tiny_causal_lm, prompts, tmp_path):
    (tmp_path / "broken_rewards.py").write_text("import no_such_package_here\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", rewards=["broken_rewards:score"])
        with pytest.raises(ConfigError) as caught:
            validate_config(raw)
    finally:
        sys.path.remove(str(tmp_path))
    text = str(caught.value)
    assert "importing module 'broken_rewards' failed: ModuleNotFoundError: No module named" in text
    assert "no_such_package_here" in text and not (tmp_path / "run").exists()


def test_grpo_settings_belong_to_grpo(tiny_causal_lm, prompts, tmp_path):
    raw = causal_config(tiny_causal_lm, prompts, tmp_path / "run", num_generations=4)
    with pytest.raises(ConfigError, match="training.num_generations belongs to objective grpo"):
        validate_config(raw)
    raw = causal_config(tiny_causal_lm, prompts, tmp_path / "run", rewards=["json_match"])
    with pytest.raises(ConfigError, match="training.rewards score sampled completions for objective grpo"):
        validate_config(raw)


def test_a_row_without_a_field_a_reward_reads_is_malformed_and_named(tiny_causal_lm, prompts, tmp_path):
    raw = grpo_config(
        tiny_causal_lm, prompts, tmp_path / "run", rewards=["grpo_rewards:needs_topic"], max_steps=1
    )
    raw["data"]["max_bad_fraction"] = 0.6
    with pytest.warns(UserWarning, match=r"24 of 48 rows are malformed") as caught:
        train(validate_config(raw))
    text = "\n".join(str(w.message) for w in caught)
    assert (
        "prompts.jsonl line 2: reward grpo_rewards:needs_topic needs field 'topic', which this row lacks"
        in text
    )


def test_a_prompt_that_leaves_no_room_for_its_completion_is_malformed(tiny_causal_lm, prompts, tmp_path):
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", max_completion_length=50, max_steps=1)
    with pytest.raises(DataError, match="48 of 48 rows are malformed") as caught:
        train(validate_config(raw))
    assert "tokens; with training.max_completion_length=50 it does not fit in data.max_length=64" in str(
        caught.value
    )


# --- rewards ---------------------------------------------------------------------------------------------------
def test_the_built_in_rewards():
    ref = ['{"sentiment": "positive"}'] * 4
    answers = ['{"sentiment":"positive"}', '{"sentiment": "negative"}', "positive", '{"label": "positive"}']
    assert json_match([""] * 4, answers, ref) == [1.0, 0.0, 0.0, 0.0]
    assert json_valid([""] * 4, answers, ref) == [1.0, 1.0, 0.0, 0.0]
    assert regex([""] * 2, ["  abc12 ", "abc"], pattern=r"[a-z]+\d+") == [1.0, 0.0]
    ids = [[1] * n for n in (4, 6, 7, 8, 9)]
    assert length_penalty([""] * 5, [""] * 5, ids, max_tokens=8, soft_tokens=4) == [
        0.0,
        -0.5,
        -0.75,
        -1.0,
        -1.0,
    ]


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (
            "grpo_rewards:raises",
            "reward grpo_rewards:raises raised RuntimeError: the grader is down (scoring "
            "completions of train data prompts.jsonl line",
        ),  # fmt: skip
        (
            "grpo_rewards:nan_on_second",
            "reward grpo_rewards:nan_on_second returned nan for a completion of train "
            "data prompts.jsonl line",
        ),  # fmt: skip
    ],
)
def test_a_reward_that_fails_stops_the_run_before_any_update(
    tiny_causal_lm, prompts, tmp_path, reward, message
):
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", rewards=[reward])
    with pytest.raises(RewardError) as caught:
        train(validate_config(raw))
    assert message in str(caught.value)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoints").exists()


# --- training --------------------------------------------------------------------------------------------------
def _records(out, split="train"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.mark.slow
def test_grpo_learns_a_dense_reward_and_logs_its_curves(tiny_causal_lm, prompts, tmp_path):
    # 48 steps: at 24 the gain was +0.05 to +0.20 over seeds 0-2 on an AMD EPYC (AVX-512, no AMX), under the
    # +0.15 asked; at 48, +0.33 to +0.54 over seeds 0-3
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", max_steps=48, batch_size=4)
    raw["eval"]["every"] = 24
    result = train(validate_config(raw))
    steps = _records(tmp_path / "run")
    first, last = steps[:4], steps[-4:]
    before = sum(r["reward"] for r in first) / 4
    after = sum(r["reward"] for r in last) / 4
    assert after > before + 0.15, (before, after)
    for key in ("reward/grpo_rewards:even_tokens", "completion_length", "clipped_ratio", "clip_ratio/region",
                "frac_reward_zero_std", "reward_std"):  # fmt: skip
        assert key in steps[0]
    assert result.validation["reward"] == result.best_metric and "json_valid" in result.validation
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    recorded = json.loads((tmp_path / "run" / "adapter" / "deltatune.json").read_text())["training_config"]
    assert recorded["objective"]["name"] == "grpo" and recorded["objective"]["reference"] is None
    assert recorded["objective"]["settings"]["loss_type"] == "dapo"
    assert recorded["objective"]["settings"]["epsilon_high"] == 0.2


@pytest.mark.slow
def test_the_kl_term_holds_the_policy_to_the_base(tiny_causal_lm, prompts, tmp_path):
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "kl", beta=0.5, max_steps=4)
    train(validate_config(raw))
    steps = _records(tmp_path / "kl")
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the adapter is still the identity
    assert steps[-1]["kl"] > 0
    recorded = json.loads((tmp_path / "kl" / "adapter" / "deltatune.json").read_text())["training_config"]
    assert recorded["objective"]["reference"] == "base (adapters off)"


@pytest.mark.slow
def test_the_same_seed_samples_the_same_completions_and_ends_with_the_same_adapter(
    tiny_causal_lm, prompts, tmp_path
):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        raw = grpo_config(tiny_causal_lm, prompts, tmp_path / name, max_steps=3, seed=seed)
        train(validate_config(raw))
        runs[name] = (
            _records(tmp_path / name),
            load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"),
        )
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(runs["a"][0]) == strip(runs["b"][0])
    assert all(runs["a"][1][k].equal(runs["b"][1][k]) for k in runs["a"][1])
    assert strip(runs["a"][0]) != strip(runs["c"][0])


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gradient_accumulation_takes_the_same_step(tiny_causal_lm, prompts, tmp_path, loss_type):
    """Two micro-batches of 2 prompts make the step that one batch of 4 makes: the same rows, the same
    samples, the same update (dapo weighs every token of the step alike across micro-batches)."""
    adapters = {}
    for name, batch, accum in (("one", 4, 1), ("two", 2, 2)):
        raw = grpo_config(tiny_causal_lm, prompts, tmp_path / name, max_steps=2, batch_size=batch, grad_accum=accum,
                          loss_type=loss_type)  # fmt: skip
        raw["optim"]["max_grad_norm"] = None
        train(validate_config(raw))
        adapters[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert _records(tmp_path / "one")[0]["reward"] == _records(tmp_path / "two")[0]["reward"]
    for key, value in adapters["one"].items():
        torch.testing.assert_close(value, adapters["two"][key], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "method",
    [
        {
            "method": "ia3",
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        },
        {"method": "prompt_tuning", "num_virtual_tokens": 3},
    ],
    ids=["ia3", "prompt_tuning"],
)
@pytest.mark.slow
def test_adapters_the_engine_cannot_batch_sample_through_transformers_generate(
    tiny_causal_lm, prompts, tmp_path, method, capfd
):
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", max_steps=2)
    raw["adapter"] = method
    train(validate_config(raw))
    err = capfd.readouterr().err
    assert err.count("GRPO samples through transformers' generate, not the decode engine:") == 1
    assert len(_records(tmp_path / "run")) == 2


@pytest.mark.slow
def test_eval_scores_a_grpo_adapter_with_its_rewards(tiny_causal_lm, prompts, tmp_path):
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", max_steps=3)
    raw["eval"]["every"] = 3
    result = train(validate_config(raw))
    cfg = validate_config(raw)
    scored = evaluate_adapter(cfg, tmp_path / "run" / "adapter")
    assert scored["reward"] == pytest.approx(result.validation["reward"], abs=1e-9)
    assert scored["json_valid"] == result.validation["json_valid"]
    assert "reward/grpo_rewards:even_tokens" in scored


@pytest.mark.slow
def test_the_forgetting_monitor_watches_a_grpo_run(tiny_causal_lm, prompts, tmp_path):
    corpus = tmp_path / "general.txt"
    corpus.write_text("the day was very good and the food was lovely\nmy phone is so bad today\na movie\n")
    raw = grpo_config(tiny_causal_lm, prompts, tmp_path / "run", max_steps=4)
    raw["eval"] |= {"every": 2, "forgetting": {"corpus": str(corpus), "texts": 3, "max_tokens": 16}}
    train(validate_config(raw))
    evals = _records(tmp_path / "run", "validation")
    assert [r["step"] for r in evals] == [2, 4]
    assert (
        all(r["forgetting_kl"] > 0 for r in evals) and evals[1]["forgetting_kl"] != evals[0]["forgetting_kl"]
    )


def test_a_reward_taking_kwargs_gets_every_column_as_trl_passes_the_row():
    from deltatune.task.rewards import load_rewards, score

    seen = {}

    def greedy(prompts, completions, **fields):
        seen.update(fields)
        return [1.0] * len(completions)

    import types

    module = types.ModuleType("kwargs_rewards")
    module.greedy = greedy
    import sys

    sys.modules["kwargs_rewards"] = module
    try:
        rewards = load_rewards(["kwargs_rewards:greedy"], 8)
        rows = [
            {"text": "a", "reference": "r", "__line__": 3},
            {"text": "b", "reference": "s", "__line__": 4},
        ]
        assert score(rewards, ["p", "q"], ["x", "y"], rows, [[1], [2]], str) == [[1.0], [1.0]]
    finally:
        del sys.modules["kwargs_rewards"]
    assert seen == {"text": ["a", "b"], "reference": ["r", "s"], "completion_ids": [[1], [2]]}
