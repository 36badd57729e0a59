"""Preference tuning on the tiny model: the data formats (strings and TRL's conversational form, KTO's
unpaired rows), their malformed rows, the objective's config checks, and training with each objective:
it learns, records what it optimised, keeps no second model, continues an adapter against a frozen copy of
it, precomputes a full fine-tune's reference, and stops on a NaN naming the objective."""

from __future__ import annotations

import gc
import json
import math
import re

import pytest
import torch
from train_helpers import causal_config, sentiment_rows, write_jsonl

from deltatune.data import load_data
from deltatune.data.formats import IGNORE
from deltatune.task.loading import load_tokenizer
from deltatune.train import ConfigError, NonFiniteLossError, evaluate_adapter, train, validate_config

OPPOSITE = {"positive": "negative", "negative": "positive"}


def pair_rows(n: int, seed: int) -> list[dict]:
    """The chosen answer is JSON; the rejected one says the same in prose, or names the wrong class (every
    third row): the format is learnable in a few steps by the tiny model, the keyword rule slowly."""
    return [
        {"prompt": "Sentiment of: " + r["text"], "chosen": json.dumps({"sentiment": r["label"]}),
         "rejected": json.dumps({"sentiment": OPPOSITE[r["label"]]}) if i % 3 == 0 else f"It is {r['label']}."}
        for i, r in enumerate(sentiment_rows(n, seed))
    ]  # fmt: skip


def kto_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for i, pair in enumerate(pair_rows(n, seed)):
        good = i % 2 == 0
        rows.append(
            {"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good}
        )
    return rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows(200, 0))


def preference_config(model, data, out, objective="dpo", **training) -> dict:
    raw = causal_config(model, data, out, objective=objective, **training)
    raw["data"]["format"] = "unpaired_preference" if objective == "kto" else "preference"
    raw["optim"]["lr"] = 3e-2
    raw["eval"] = {"every": 20, "metric": "reward_accuracy"}
    return raw


# --- data -----------------------------------------------------------------------------------------------------
def _splits(model, rows, tmp_path, fmt="preference", **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = preference_config(model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "run",
                            "kto" if fmt == "unpaired_preference" else "dpo")  # fmt: skip
    raw["data"] |= {"format": fmt, "max_bad_fraction": 0.5, **data}
    cfg = validate_config(raw)
    tokenizer = load_tokenizer(cfg.model)
    return load_data(cfg.data, tokenizer, 0), tokenizer, cfg


def test_a_string_pair_renders_its_prompt_as_an_instruction_row_does(tiny_causal_lm, tmp_path):
    from deltatune.data.formats import Encoder

    splits, tokenizer, cfg = _splits(tiny_causal_lm, pair_rows(20, 1), tmp_path, system_prompt="Be brief.")
    example = splits.train[0]
    assert example.input_ids[: len(example.prompt_ids)] == example.prompt_ids
    assert example.labels[: len(example.prompt_ids)] == [IGNORE] * len(example.prompt_ids)
    text = tokenizer.decode(example.prompt_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSentiment of: ")
    instruction = Encoder(tokenizer, cfg.data.model_copy(update={"format": "instruction"}))
    prompt = text.split("user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert instruction.prompt_ids({"instruction": prompt}) == example.prompt_ids
    chosen = tokenizer.decode(example.input_ids[len(example.prompt_ids) :])
    rejected = tokenizer.decode(example.rejected_ids)
    assert chosen.endswith("<|im_end|>\n") and rejected.endswith("<|im_end|>\n")  # the end of turn is learned
    assert chosen != rejected and json.loads(chosen.removesuffix("<|im_end|>\n"))["sentiment"] in OPPOSITE


def test_the_conversational_form_renders_through_the_chat_template(tiny_causal_lm, tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in pair_rows(20, 2)
    ]  # fmt: skip
    strings = pair_rows(20, 2)
    conversational, tokenizer, _ = _splits(tiny_causal_lm, rows, tmp_path / "c")
    plain, _, _ = _splits(tiny_causal_lm, strings, tmp_path / "s")
    # the same pairs in both forms give the same ids
    for a, b in zip(
        conversational.train + conversational.validation, plain.train + plain.validation, strict=True
    ):
        assert (a.input_ids, a.prompt_ids, a.rejected_ids) == (b.input_ids, b.prompt_ids, b.rejected_ids)


def test_malformed_pairs_are_counted_and_named(tiny_causal_lm, tmp_path):
    good = pair_rows(30, 3)
    bad = [
        {"prompt": "same", "chosen": "x y", "rejected": "x y"},
        {"prompt": "empty", "chosen": "", "rejected": "no"},
        {"prompt": "long " * 80, "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]},
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="4 of 34 rows are malformed") as caught:
        splits, _, _ = _splits(tiny_causal_lm, good + bad, tmp_path, max_length=64)
    listing = str(caught[0].message)
    assert "line 31: chosen and rejected are the same answer" in listing
    assert "line 32: missing or empty field 'chosen'" in listing
    assert "line 33: prompt is" in listing and "no room for an answer within data.max_length=64" in listing
    assert "line 34: missing or empty chosen" in listing
    assert len(splits.train) + len(splits.validation) == 30


def test_duplicates_are_the_same_prompt_and_answers_also_through_a_template(tiny_causal_lm, tmp_path):
    rows = [
        {"tweet": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pair_rows(30, 9)
    ]
    copies = rows + rows[:5] + [dict(rows[0], rejected="another answer")]  # 5 duplicates, 1 new pair
    splits, _, _ = _splits(tiny_causal_lm, copies, tmp_path, instruction_template="Label: {tweet}")
    assert splits.report.duplicates == 5
    assert len(splits.train) + len(splits.validation) == 31


def test_a_missing_column_is_named_with_the_fix(tiny_causal_lm, tmp_path):
    rows = [
        {"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pair_rows(10, 4)
    ]
    with pytest.raises(Exception, match=r"no column 'prompt'.*Set data.columns.prompt"):
        _splits(tiny_causal_lm, rows, tmp_path)
    splits, _, _ = _splits(tiny_causal_lm, rows, tmp_path / "ok", columns={"prompt": "question"})
    assert len(splits.train) + len(splits.validation) == 10


def test_unpaired_rows_read_their_label_and_refuse_a_bad_one(tiny_causal_lm, tmp_path):
    rows = kto_rows(20, 5)
    rows[0]["label"], rows[1]["label"], rows[2]["label"] = "yes", 0, "maybe"
    with pytest.warns(UserWarning, match=r"line 3: label 'maybe' is not true or false"):
        splits, _, _ = _splits(tiny_causal_lm, rows, tmp_path, fmt="unpaired_preference")
    flags = [e.desirable for e in splits.train + splits.validation]
    assert len(flags) == 19  # the row labelled "maybe" is skipped
    assert sum(flags) == sum(1 for r in rows[3:] if r["label"]) + 1  # "yes" is desirable, 0 is not


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("training", "fmt", "message"),
    [
        ({"objective": "dpo", "simpo_gamma": 0.5}, "preference", "training.simpo_gamma belongs to objective simpo, not training.objective=dpo"),
        ({"objective": "orpo", "desirable_weight": 2.0}, "preference", "belongs to objective kto"),
        ({"objective": "sft", "beta": 0.1}, "instruction", "training.beta belongs to objective dpo / ipo / orpo / simpo / kto"),
        ({"objective": "dpo"}, "instruction", "training.objective=dpo learns from data.format preference"),
        ({"objective": "ipo"}, "unpaired_preference", "learns from data.format preference, got 'unpaired_preference'"),
        ({"objective": "kto"}, "preference", "objective=kto learns from data.format unpaired_preference, got 'preference'"),
        ({"objective": "dpo", "loss_type": "squared"}, "preference", "training.loss_type"),
        ({"objective": "dpo", "loss_type": ["sigmoid", "dapo"]}, "preference", "training.loss_type=['sigmoid', 'dapo']: dapo is not a loss of objective dpo; choose one of ['sigmoid', 'hinge', 'robust', 'sft']"),
        ({"objective": "dpo", "loss_type": ["sigmoid", "sigmoid"]}, "preference", "each loss named once"),
        ({"objective": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "preference", "training.loss_weights=[1.0] gives 1 weight(s) for 2 loss(es)"),
        ({"objective": "dpo", "loss_weights": [1.0, 0.5]}, "preference", "gives 2 weight(s) for 1 loss(es) in training.loss_type=sigmoid"),
        ({"objective": "dpo", "loss_type": []}, "preference", "each loss named once"),
        ({"objective": "ipo", "loss_weights": [1.0]}, "preference", "training.loss_weights belongs to objective dpo, not training.objective=ipo"),
        ({"objective": "dpo", "kl_penalty": 0.1}, "preference", "training.kl_penalty applies to the next-token objective"),
    ],
)  # fmt: skip
def test_objective_settings_are_checked(tiny_causal_lm, pairs, tmp_path, training, fmt, message):
    raw = causal_config(tiny_causal_lm, pairs, tmp_path / "run", **training)
    raw["data"]["format"] = fmt
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(raw)


def test_kl_penalty_on_a_full_fine_tune_is_refused_with_the_reason(tiny_causal_lm, pairs, tmp_path):
    raw = causal_config(tiny_causal_lm, pairs, tmp_path / "run", kl_penalty=0.5)
    raw["adapter"] = {"method": "full"}
    with pytest.raises(ConfigError, match="second copy of the whole model"):
        validate_config(raw)


# --- training -------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_each_paired_objective_learns_to_prefer_the_chosen_answer(tiny_causal_lm, pairs, tmp_path, objective):
    raw = preference_config(tiny_causal_lm, pairs, tmp_path / "run", objective, max_steps=60, batch_size=8)
    cfg = validate_config(raw)
    before = evaluate_adapter(cfg, None)
    result = train(cfg)
    assert result.validation["reward_accuracy"] >= 0.85, result.validation
    assert result.validation["reward_margin"] > 0
    after = evaluate_adapter(cfg, result.saved_to)  # `deltatune eval` reads the same numbers back
    assert after["reward_accuracy"] == pytest.approx(result.validation["reward_accuracy"])
    assert after["loss"] == pytest.approx(result.validation["loss"], rel=1e-4)
    if objective in ("dpo", "ipo"):  # the bare base is its own reference: every reward 0
        assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.0
    record = json.loads((result.saved_to / "deltatune.json").read_text())["training_config"]
    assert record["training"]["objective"] == objective
    assert record["objective"]["reference"] == (
        "base (adapters off)" if objective in ("dpo", "ipo") else None
    )
    assert record["objective"]["settings"]["beta"] == cfg.objective_settings["beta"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if r["split"] == "train"]
    assert {"rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"} <= train_rows[-1].keys()


@pytest.mark.slow
def test_kto_learns_from_unpaired_answers(tiny_causal_lm, tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_rows(200, 6))
    raw = preference_config(tiny_causal_lm, data, tmp_path / "run", "kto", max_steps=60, batch_size=8)
    corpus = tmp_path / "general.txt"
    corpus.write_text("the movie was long and the day was so sad\nmy phone is a very good phone today\n")
    raw["eval"]["forgetting"] = {"corpus": str(corpus), "texts": 2}  # the monitor runs beside any objective
    result = train(validate_config(raw))
    assert result.validation["reward_accuracy"] >= 0.8 and result.validation["reward_margin"] > 0
    assert result.validation["forgetting_kl"] > 0


def _parameter_bytes() -> int:
    """Bytes of every distinct parameter storage alive in the process. Parameters without real storage (meta
    or fake tensors other tests leave behind) hold no memory and are passed over."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.nn.Parameter) or obj.is_meta:
            continue
        try:
            pointer = obj.untyped_storage().data_ptr()
        except RuntimeError:  # FakeTensor / FunctionalTensor: no data
            continue
        if pointer not in seen:
            seen.add(pointer)
            total += obj.untyped_storage().nbytes()
    return total


@pytest.mark.slow
def test_the_reference_is_no_second_model(tiny_causal_lm, pairs, tmp_path, monkeypatch):
    """Counted during a DPO step: every parameter storage made since the run started belongs to the one model
    (what earlier tests left alive, such as a compiled decode step's frozen constants, is counted before)."""
    from deltatune.train import loop

    seen = {}
    real = loop.Trainer._micro_batch_loss

    def counting(self, model, idx, rewards):
        gc.collect()
        seen["alive"] = _parameter_bytes()
        seen["model"] = sum(
            p.untyped_storage().nbytes()
            for p in {p.untyped_storage().data_ptr(): p for p in self.model.parameters()}.values()
        )
        return real(self, model, idx, rewards)

    monkeypatch.setattr(loop.Trainer, "_micro_batch_loss", counting)
    gc.collect()
    before = _parameter_bytes()
    train(validate_config(preference_config(tiny_causal_lm, pairs, tmp_path / "run", max_steps=1)))
    assert seen["alive"] - before == seen["model"] > 0


@pytest.mark.slow
def test_continuing_an_adapter_judges_pairs_against_a_frozen_copy_of_it(tiny_causal_lm, pairs, tmp_path):
    sft = causal_config(tiny_causal_lm, pairs, tmp_path / "sft", max_steps=10)
    sft["data"]["format"] = "preference"  # sft on preference data trains on the chosen answers
    start = train(validate_config(sft)).saved_to
    raw = preference_config(tiny_causal_lm, pairs, tmp_path / "dpo", max_steps=10, init_adapter=str(start))
    with pytest.raises(
        ConfigError, match=r"brings its own adapter settings; remove \['lora_alpha', 'lora_dropout', 'r'"
    ):
        validate_config(raw)
    raw["adapter"] = {"method": "lora"}
    raw["training"]["log_every"] = 1
    result = train(validate_config(raw))
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = logged[0]
    assert first["step"] == 1 and first["rewards_chosen"] == 0.0 and first["rewards_rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == its reference at step 1
    record = json.loads((result.saved_to / "deltatune.json").read_text())["training_config"]
    assert record["objective"]["reference"] == f"adapter {start} (frozen copy)"
    again = evaluate_adapter(validate_config(raw), result.saved_to)  # `deltatune eval` judges against it too
    assert again["reward_accuracy"] == pytest.approx(result.validation["reward_accuracy"])
    assert again["reward_margin"] == pytest.approx(result.validation["reward_margin"], rel=1e-4)
    from safetensors.torch import load_file

    saved = load_file(result.saved_to / "adapter_model.safetensors")
    assert not any("reference" in key for key in saved)  # only the trained adapter is saved
    assert any(
        not torch.equal(saved[k], v) for k, v in load_file(start / "adapter_model.safetensors").items()
    )


@pytest.mark.slow
def test_a_full_fine_tune_keeps_its_reference_from_before_step_one(tiny_causal_lm, pairs, tmp_path):
    raw = preference_config(tiny_causal_lm, pairs, tmp_path / "run", max_steps=6)
    raw["adapter"] = {"method": "full"}
    raw["optim"]["lr"] = 1e-3
    raw["training"]["log_every"] = 1
    result = train(validate_config(raw))
    kept = tmp_path / "run" / "reference_logps.safetensors"
    from safetensors.torch import load_file

    reference = load_file(kept)
    assert reference["train"].shape == (160, 2) and reference["validation"].shape == (40, 2)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the model is its reference at step 1
    assert logged[-2]["reward_margin"] != 0.0
    assert result.validation["reward_accuracy"] > 0.5


def test_a_nan_loss_names_the_objective_and_keeps_the_last_checkpoint(
    tiny_causal_lm, pairs, tmp_path, monkeypatch
):
    from deltatune.train import preference

    calls = {"n": 0}
    real = preference.preference_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(preference, "preference_loss", poisoned)
    raw = preference_config(tiny_causal_lm, pairs, tmp_path / "run", max_steps=10, checkpoint_every=2)
    raw["eval"]["every"] = None
    with pytest.raises(
        NonFiniteLossError,
        match=r"training loss \(dpo objective\) is nan at step 5; stopped\. the last good checkpoint is .*step-00000004",
    ):
        train(validate_config(raw))
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "meta.json").exists()
