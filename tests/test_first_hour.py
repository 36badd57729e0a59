"""A new user's first hour (issue 22): a trained classifier is usable from the CLI with its labels by name,
generation renders prompts as training did, and bad input gets one line that names the fix."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import yaml
from train_helpers import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    causal_config,
    classification_config,
    write_config,
    write_jsonl,
)

import deltatune as dt
from deltatune.cli.main import main
from deltatune.train import train, validate_config

LABELS = ["negative", "neutral", "positive"]


def _topic_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(FILLER, 4)
        words.append(
            rng.choice({"positive": POSITIVE, "negative": NEGATIVE, "neutral": ["meh", "okay"]}[label])
        )
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "stars": label})
    return rows


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("first-hour")
    train_file = write_jsonl(root / "train.jsonl", _topic_rows(400, 0))
    val_rows = [r for r in _topic_rows(120, 1) if r["stars"] != "neutral"]  # a class missing from validation
    val_file = write_jsonl(root / "val.jsonl", val_rows)
    data = {
        "train": str(train_file),
        "validation": str(val_file),
        "columns": {"text": "review", "label": "stars"},
    }
    raw = classification_config(tiny_bert, data, root / "run", max_steps=800)
    config = write_config(root / "c.yaml", raw)
    return config, train(validate_config(raw)), val_rows


@pytest.mark.slow
def test_the_labels_are_saved_with_the_adapter_and_shown(classifier_run, capsys):
    _, result, _ = classifier_run
    record = json.loads((result.saved_to / "deltatune.json").read_text())
    assert record["labels"] == {
        "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
        "label2id": {"negative": 0, "neutral": 1, "positive": 2},
    }
    assert record["training_config"]["data"]["labels"] == LABELS  # the config the head is built from
    assert yaml.safe_load((result.output_dir / "config.yaml").read_text())["data"]["labels"] == LABELS
    assert main(["inspect", str(result.saved_to)]) == 0
    assert 'labels: {"0": "negative", "1": "neutral", "2": "positive"}' in capsys.readouterr().out


def test_classify_from_the_cli_gives_labels_by_name_and_agrees_with_eval(
    classifier_run, tiny_bert, tmp_path, capsys
):
    config, result, val_rows = classifier_run
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(r["review"] + "\n" for r in val_rows))
    assert main(["classify", "--base", str(tiny_bert), "--adapter", str(result.saved_to), "--input", str(texts),
                 "--jsonl"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == [r["review"] for r in val_rows]
    for line in lines:
        assert set(line["probabilities"]) == set(LABELS) and sum(
            line["probabilities"].values()
        ) == pytest.approx(1)
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get)
    accuracy = sum(line["label"] == r["stars"] for line, r in zip(lines, val_rows, strict=True)) / len(
        val_rows
    )
    assert main(["eval", str(config), "--adapter", str(result.saved_to)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert accuracy == pytest.approx(metrics["accuracy"])  # two code paths, one answer
    # eval scored with the adapter's label order although validation has no "neutral" row
    assert set(metrics["per_class"]) == set(LABELS) and metrics["per_class"]["neutral"]["support"] == 0
    assert metrics["majority_baseline"]["accuracy"] == pytest.approx(
        max(sum(r["stars"] == name for r in val_rows) for name in LABELS) / len(val_rows)
    )
    assert metrics["accuracy"] > metrics["majority_baseline"]["accuracy"] + 0.2, metrics
    for name in ("negative", "positive"):
        assert (
            0 < metrics["per_class"][name]["precision"] <= 1 and 0 < metrics["per_class"][name]["recall"] <= 1
        )
    assert main(["classify", "--base", str(tiny_bert), "--adapter", str(result.saved_to), "good day"]) == 0
    label, probability, text = capsys.readouterr().out.rstrip("\n").split("\t")
    assert label in LABELS and 0 < float(probability) <= 1 and text == "good day"


def test_generate_on_a_classifier_points_to_classify(classifier_run, tiny_bert, capsys):
    _, result, _ = classifier_run
    assert main(["generate", "--base", str(tiny_bert), "--adapter", str(result.saved_to), "hi"]) == 2
    err = capsys.readouterr().err
    assert "is a classifier (labels negative, neutral, positive)" in err and "deltatune classify" in err


def test_training_explains_the_new_head_instead_of_the_load_report(
    classifier_run, tiny_bert, tmp_path, capfd
):
    from deltatune.models.spec import ModelSpec
    from deltatune.task.loading import load_model, load_tokenizer

    spec = ModelSpec(path=str(tiny_bert), task="classification")
    load_model(spec, load_tokenizer(spec), LABELS)
    err = capfd.readouterr().err
    assert "MISSING" not in err and "LOAD REPORT" not in err
    assert "the classification head is new: it starts random and trains in full" in err


def test_an_adapter_for_another_base_is_caught_by_its_fingerprint(classifier_run, tiny_causal_lm, capsys):
    from transformers import AutoModelForCausalLM

    _, result, _ = classifier_run
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    with pytest.raises(
        dt.BaseModelMismatchError, match="architecture BertForSequenceClassification .* vs Llama"
    ):
        dt.load_adapter(model, result.saved_to)
    args = ["classify", "--base", str(tiny_causal_lm), "--adapter", str(result.saved_to), "hi"]
    assert main(args) == 2
    assert "trained on a different base model" in capsys.readouterr().err
    assert main([*args, "--allow-base-mismatch"]) == 2  # past the fingerprint; the modules are not there
    assert "different base model" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("base", "needle"),
    [
        ("./no/such/folder", "model folder ./no/such/folder does not exist"),
        ("smolm2", "'smolm2' is not a bundled model; did you mean 'smollm2'?"),
    ],  # fmt: skip
)
def test_a_missing_model_is_one_line_not_a_traceback(base, needle, capsys):
    assert main(["generate", "--base", base, "hi"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def templated_run(tmp_path_factory, tiny_causal_lm):
    """Instruction data whose template names its own column ({question}), not {text}."""
    root = tmp_path_factory.mktemp("templated")
    rows = [{"question": f"what is {w}?", "output": f"{w} is a word"} for w in FILLER * 4]
    data = write_jsonl(root / "d.jsonl", rows)
    raw = causal_config(tiny_causal_lm, data, root / "run", max_steps=2)
    raw["data"]["instruction_template"] = "Q: {question}"
    raw["data"]["system_prompt"] = "Answer briefly."
    config = write_config(root / "c.yaml", raw)
    return config, raw, train(validate_config(raw))


def test_generate_with_a_config_renders_prompts_as_training_did(templated_run, tiny_causal_lm, capsys):
    from deltatune.data import load_data
    from deltatune.generation import Generator
    from deltatune.task.loading import load_tokenizer
    from deltatune.train import load_train_config

    config, raw, result = templated_run
    cfg = load_train_config(config)
    example = load_data(cfg.data, load_tokenizer(cfg.model), cfg.training.seed).train[0]
    generator = Generator(str(tiny_causal_lm), result.saved_to).for_config(cfg.data)
    question = next(
        r["question"] for r in map(json.loads, Path(raw["data"]["train"]).read_text().splitlines())
        if generator.prompt_ids({"question": r["question"]}) == example.prompt_ids
    )  # fmt: skip
    assert generator.prompt_ids(question) == example.prompt_ids  # a plain prompt fills the template's field
    assert main(["generate", "--config", str(config), "--adapter", str(result.saved_to), "--max-new-tokens", "3",
                 question, json.dumps({"question": question})]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "\n[2] " in out


def test_generate_from_stdin_keeps_answers_and_prompts_aligned(
    templated_run, tiny_causal_lm, monkeypatch, capsys
):
    _, _, result = templated_run
    prompts = ["first question", "second question", "third question"]
    base = [
        "generate",
        "--base",
        str(tiny_causal_lm),
        "--adapter",
        str(result.saved_to),
        "--max-new-tokens",
        "12",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n"))
    assert main([*base, "--jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == prompts and all(isinstance(r["answer"], str) for r in records)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n"))
    from deltatune import generation

    monkeypatch.setattr(generation.Generator, "__call__", lambda self, p, **kw: f"answer to\n{p}\n\nend")
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith("    ")] == [
        "[1] answer to",
        "[2] answer to",
        "[3] answer to",
    ]
    assert lines[1:4] == ["    first question", "    ", "    end"]


def _causal_cli_config(root: Path, tiny_causal_lm, **training) -> Path:
    data = write_jsonl(root / "d.jsonl", [{"instruction": f"say {w}", "output": w} for w in FILLER * 3])
    return write_config(root / "c.yaml", causal_config(tiny_causal_lm, data, root / "run", **training))


def test_the_train_report_says_which_step_time_it_prints(tmp_path, tiny_causal_lm, capsys):
    assert main(["train", str(_causal_cli_config(tmp_path, tiny_causal_lm, max_steps=3))]) == 0
    captured = capsys.readouterr()
    assert "median " in captured.out and " s/step, mean " in captured.out
    assert "data: " in captured.err and "examples: train " in captured.err  # the data summary


def test_the_whole_config_is_checked_before_anything_loads(tmp_path, tiny_causal_lm, monkeypatch, capsys):
    import deltatune.train as train_module

    def heavy(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the config was checked")

    monkeypatch.setattr(train_module, "load_tokenizer", heavy)
    config = _causal_cli_config(tmp_path, tiny_causal_lm)
    assert main(["train", str(config), "adapter.rank=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['rank'] in adapter (method lora)" in err
    assert "from the command-line override 'adapter.rank=8', not the file" in err
    assert main(["train", str(config), "training.max_steps=many"]) == 2
    err = capsys.readouterr().err
    assert "training.max_steps" in err and "from the command-line override 'training.max_steps=many'" in err


@pytest.mark.slow
def test_a_moved_run_folder_resumes_where_it_is(tmp_path, tiny_causal_lm, capsys):
    import shutil

    config = _causal_cli_config(tmp_path, tiny_causal_lm, max_steps=4, checkpoint_every=2)
    assert main(["train", str(config)]) == 0
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "run", moved)
    capsys.readouterr()
    assert main(["train", str(moved / "config.yaml"), "--resume", "training.max_steps=6"]) == 0
    assert f"resuming in {moved}" in capsys.readouterr().err
    assert "step-00000006" in {p.name for p in (moved / "checkpoints").iterdir()}
    assert not (tmp_path / "run").exists()  # nothing was written at the old place
