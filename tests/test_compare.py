"""`deltatune compare` (evaluate/transfer.py, compare_report.py): each cell equals what `deltatune eval` gives
for that adapter and task, the base and each adapter are loaded once for all tasks, the change against the
base and the reusability summary follow from the cells, and a failing cell, task or adapter is recorded
without stopping the rest."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import (
    causal_config,
    classification_config,
    instruction_rows,
    sentiment_rows,
    write_config,
    write_jsonl,
)

import deltatune as dt
from deltatune.evaluate import compare_report, transfer
from deltatune.evaluate.compare_report import compare
from deltatune.train import evaluate_adapter, load_train_config, train


def _json_task(tiny_causal_lm, folder):
    data = write_jsonl(folder / "json.jsonl", instruction_rows(60, 0))
    cfg = causal_config(tiny_causal_lm, data, folder / "run_json", max_steps=10, seed=0)
    cfg["eval"] = {"batch_size": 8, "metric": "json_valid", "generate_metrics": ["json_valid", "json_match"],
                   "generate_samples": 6, "max_new_tokens": 8}  # fmt: skip
    return write_config(folder / "json.yaml", cfg)


def _word_task(tiny_causal_lm, folder):
    rows = [{"instruction": "Label: " + r["text"], "output": r["label"]} for r in sentiment_rows(60, 1)]
    cfg = causal_config(tiny_causal_lm, write_jsonl(folder / "word.jsonl", rows), folder / "run_word")
    cfg["eval"] = {"batch_size": 8, "metric": "loss", "generate_metrics": ["exact_match"],
                   "generate_samples": 6, "max_new_tokens": 3}  # fmt: skip
    return write_config(folder / "word.yaml", cfg)


@pytest.fixture(scope="module")
def setup(tiny_causal_lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    json_task, word_task = _json_task(tiny_causal_lm, folder), _word_task(tiny_causal_lm, folder)
    trained = train(load_train_config(json_task)).saved_to  # knows its task from its deltatune.json
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    torch.manual_seed(1)
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    random = dt.save_adapter(model, folder / "random")  # no training config: its own task is unknown
    return {"folder": folder, "json": json_task, "word": word_task, "trained": trained, "random": random}


@pytest.fixture(scope="module")
def report(setup):
    tasks = [f"json={setup['json']}", f"word={setup['word']}"]
    adapters = [f"trained={setup['trained']}", f"random={setup['random']}"]
    return compare(tasks, adapters, device="cpu", out=setup["folder"] / "report")


def _same(cell, expected):
    for key, value in expected.items():
        if isinstance(value, float):
            assert cell[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_each_cell_is_what_eval_gives(setup, report):
    for task in ("json", "word"):
        cfg = load_train_config(setup[task])
        _same(report["cells"]["base"][task], evaluate_adapter(cfg, None))
        for name in ("trained", "random"):
            _same(report["cells"][name][task], evaluate_adapter(cfg, setup[name]))


def test_change_against_the_base_and_reusability_follow_from_the_cells(report):
    head, gain = report["headline"], report["gain_vs_base"]
    assert head["trained"]["json"] == report["cells"]["trained"]["json"]["json_valid"]
    assert gain["trained"]["json"] == pytest.approx(head["trained"]["json"] - head["base"]["json"])
    # loss: lower is better, so the change is signed base - adapter
    assert report["tasks"]["word"]["higher_is_better"] is False
    assert gain["random"]["word"] == pytest.approx(head["base"]["word"] - head["random"]["word"])
    assert gain["base"]["json"] == 0.0
    trained, random = report["reusability"]["trained"], report["reusability"]["random"]
    assert trained["own_task"] == "json" and trained["tasks_counted"] == {"loss": 1}
    assert trained["mean_gain_off_task"] == {"loss": pytest.approx(gain["trained"]["word"])}
    # a loss and an accuracy are not averaged together: one mean per metric
    assert random["own_task"] is None and random["tasks_counted"] == {"json_valid": 1, "loss": 1}
    assert random["mean_gain_off_task"] == {
        "json_valid": pytest.approx(gain["random"]["json"]),
        "loss": pytest.approx(gain["random"]["word"]),
    }
    cells = report["cells"]
    assert (
        cells["trained"]["json"]["loss"] < 0.8 * cells["base"]["json"]["loss"]
    )  # 10 steps: learned its task


def test_the_report_folder(setup, report):
    out = setup["folder"] / "report"
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["headline"] == report["headline"]
    prov = saved["provenance"]
    assert len(prov["entries"]["trained"]["sha256"]) == 64 and len(prov["tasks"]["json"]["data_sha256"]) == 64
    assert {"cpu", "cores", "device"} <= set(prov["hardware"])
    md = (out / "compare.md").read_text()
    assert "| trained | json |" in md and f"{report['headline']['trained']['json']:.3f}" in md


def test_the_base_and_each_adapter_load_once_for_all_tasks(setup, monkeypatch):
    from deltatune.runtime.cache import AdapterCache
    from deltatune.task import loading as task_loading

    loads, adapter_loads = [], []
    real_model, real_load = task_loading.load_model, AdapterCache.load
    monkeypatch.setattr(task_loading, "load_model", lambda *a, **k: loads.append(1) or real_model(*a, **k))
    monkeypatch.setattr(
        AdapterCache, "load", lambda self, n, p=None: adapter_loads.append(n) or real_load(self, n, p)
    )
    three = [f"json={setup['json']}", f"word={setup['word']}", f"json2={setup['json']}"]
    compare(three, [str(setup["trained"]), f"random={setup['random']}"], device="cpu")
    assert len(loads) == 1
    assert sorted(set(adapter_loads)) == ["random", "run_json"] and len(adapter_loads) == 2


def test_failures_stay_in_their_cells(setup, tiny_causal_lm, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    dt.inject(other, dt.LoraConfig(r=2, target_modules="all-linear"))
    foreign = dt.save_adapter(other, tmp_path / "foreign")
    missing = load_train_config(setup["word"]).to_dict()
    missing["data"]["train"] = str(tmp_path / "nowhere.jsonl")
    broken = write_config(tmp_path / "broken.yaml", missing)
    real_score = transfer.score

    def flaky(model, tokenizer, task, device):
        if task.name == "word" and dt.core.adapters.adapter_in_use(model) is not None:
            raise RuntimeError("boom")
        return real_score(model, tokenizer, task, device)

    monkeypatch.setattr(transfer, "score", flaky)
    tasks = [f"json={setup['json']}", f"word={setup['word']}", f"broken={broken}"]
    got = compare(tasks, [f"foreign={foreign}", f"trained={setup['trained']}"], device="cpu")
    cells = got["cells"]
    assert (
        "does not exist" in cells["base"]["broken"]["error"]
        and "task data" in cells["trained"]["broken"]["error"]
    )
    assert "error" in cells["foreign"]["json"] and "error" in cells["foreign"]["word"]
    assert "boom" in cells["trained"]["word"]["error"] and "json_valid" in cells["trained"]["json"]
    assert "json_valid" in cells["base"]["json"] and "loss" in cells["base"]["word"]
    assert got["headline"]["trained"]["word"] is None and got["gain_vs_base"]["foreign"]["json"] is None
    assert "error: RuntimeError: boom" in compare_report.table(got)


def test_a_model_folder_row_and_the_cli(setup, tiny_causal_lm, tmp_path, capsys):
    from deltatune.cli.main import main

    out = tmp_path / "report"
    args = ["compare", "--task", f"json={setup['json']}", "--model", f"copy={tiny_causal_lm}",
            "--adapter", f"random={setup['random']}", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert (
        saved["cells"]["copy"]["json"]["loss"] == saved["cells"]["base"]["json"]["loss"]
    )  # the same weights
    assert saved["gain_vs_base"]["copy"]["json"] == 0.0
    assert "| copy |" in capsys.readouterr().out


def test_bad_input_fails_before_anything_is_written(setup, tmp_path):
    out = tmp_path / "report"
    with pytest.raises(dt.core.errors.AdapterNotFoundError):
        compare([str(setup["json"])], [str(tmp_path)], out=out)
    with pytest.raises(ValueError, match="share a name"):
        compare([str(setup["json"]), str(setup["json"])], [str(setup["random"])], out=out)
    with pytest.raises(dt.train.ConfigError, match="does not exist"):
        compare([str(tmp_path / "none.yaml")], [str(setup["random"])], out=out)
    assert not out.exists()


def test_a_classifier_head_that_does_not_fit_the_task_labels(tiny_bert, tmp_path):
    two = write_jsonl(tmp_path / "two.jsonl", sentiment_rows(40, 0))
    three_rows = [
        {**r, "label": r["label"] if i % 3 else "neutral"} for i, r in enumerate(sentiment_rows(40, 2))
    ]
    three = write_jsonl(tmp_path / "three.jsonl", three_rows)
    cfg2 = classification_config(
        tiny_bert, {"train": str(two), "validation_fraction": 0.25}, tmp_path / "c2", max_steps=3
    )
    cfg3 = classification_config(
        tiny_bert, {"train": str(three), "validation_fraction": 0.25}, tmp_path / "c3"
    )
    adapter = train(load_train_config(write_config(tmp_path / "two.yaml", cfg2))).saved_to
    got = compare([f"two={tmp_path / 'two.yaml'}", f"three={write_config(tmp_path / 'three.yaml', cfg3)}"],
                  [f"clf={adapter}"], device="cpu")  # fmt: skip
    assert "accuracy" in got["cells"]["clf"]["two"]
    assert "trained on the labels ['negative', 'positive']" in got["cells"]["clf"]["three"]["error"]
    assert "accuracy" in got["cells"]["base"]["three"]  # the base (random head) still scores every task


def test_a_fine_tuned_model_folder_knows_its_own_task_from_its_provenance(setup, tmp_path):
    from deltatune.evaluate.compare_report import own_task
    from deltatune.evaluate.transfer import Entry, load_tasks

    tasks = load_tasks([("json", setup["json"]), ("word", setup["word"])])
    folder = tmp_path / "full"
    folder.mkdir()
    trained_on = dt.core.provenance.record(training_config=load_train_config(setup["word"]).to_dict())
    (folder / "deltatune.json").write_text(json.dumps(trained_on))
    assert own_task(Entry("full", "model", folder), tasks) == "word"
    assert own_task(Entry("merged", "model", tmp_path), tasks) is None  # no deltatune.json


def test_a_cache_budget_evicts_adapters_and_changes_no_cell(setup, report, monkeypatch):
    from deltatune.runtime.cache import AdapterCache

    dropped = []  # evicted outright, or unloaded into a free slot that the next adapter is copied into
    for method in ("_drop", "unload"):
        real = getattr(AdapterCache, method)
        spy = lambda self, name, real=real: dropped.append(name) or real(self, name)  # noqa: E731
        monkeypatch.setattr(AdapterCache, method, spy)
    one = (setup["random"] / "adapter_model.safetensors").stat().st_size
    tasks = [f"json={setup['json']}", f"word={setup['word']}"]
    adapters = [f"trained={setup['trained']}", f"random={setup['random']}"]
    got = compare(tasks, adapters, device="cpu", cache_mb=1.5 * one / 2**20)  # room for one adapter
    assert dropped == ["trained"]  # loading the second evicted the first
    for name in ("trained", "random"):
        for task in ("json", "word"):
            _same(
                got["cells"][name][task],
                {k: v for k, v in report["cells"][name][task].items() if k != "sample_answers"},
            )


def test_a_combined_adapter_owns_the_tasks_of_its_sources(setup, tmp_path):
    from deltatune.evaluate.compare_report import own_task
    from deltatune.evaluate.transfer import Entry, load_tasks

    tasks = load_tasks([("json", setup["json"]), ("word", setup["word"])])
    for name in ("json", "word"):
        (tmp_path / name).mkdir()
        trained = dt.core.provenance.record(training_config=load_train_config(setup[name]).to_dict())
        (tmp_path / name / "deltatune.json").write_text(json.dumps(trained))
    (tmp_path / "both").mkdir()
    sources = [
        {"path": str(tmp_path / "json")},
        {"path": str(tmp_path / "word")},
        {"path": str(tmp_path / "gone")},
    ]
    combined = dt.core.provenance.record(derived_from={"method": "ties", "sources": sources})
    (tmp_path / "both" / "deltatune.json").write_text(json.dumps(combined))
    assert own_task(Entry("both", "adapter", tmp_path / "both"), tasks) == "json+word"


def test_a_task_that_shares_its_prompt_prefix_is_scored_the_same(setup, report, tmp_path, monkeypatch):
    """A task config with training.shared_prefix scores its rows with the prefix run once per batch, as
    `deltatune eval` does; the cell is the one the plain scoring gives."""
    import yaml

    from deltatune.task import loss as evaluate_module

    raw = yaml.safe_load(setup["json"].read_text())
    raw["training"]["shared_prefix"] = True
    sharing = write_config(tmp_path / "json_shared.yaml", raw)
    calls, real = [], evaluate_module.continuation
    monkeypatch.setattr(evaluate_module, "continuation", lambda *a: calls.append(a[2]) or real(*a))
    shared = compare([f"json={sharing}"], [f"trained={setup['trained']}"], device="cpu", out=tmp_path / "r")
    assert calls  # the prefix was shared, in the base's cell and the adapter's
    for entry in ("base", "trained"):
        _same(shared["cells"][entry]["json"], report["cells"][entry]["json"])


def test_overrides_apply_to_every_task_config(tiny_causal_lm, tmp_path):
    from deltatune.cli.main import build_parser

    one, two = _json_task(tiny_causal_lm, tmp_path), _word_task(tiny_causal_lm, tmp_path)
    tasks = transfer.load_tasks([("one", one), ("two", two)], ["eval.batch_size=3", "data.max_length=40"])
    assert [(t.config.eval.batch_size, t.config.data.max_length) for t in tasks] == [(3, 40), (3, 40)]
    args = build_parser().parse_args(["compare", "--task", str(one), "--adapter", "x", "eval.batch_size=3"])
    assert args.overrides == ["eval.batch_size=3"]
    with pytest.raises(Exception, match="eval.batch_sise"):
        transfer.load_tasks([("one", one)], ["eval.batch_sise=3"])


def test_progress_counts_the_cells(setup, report, monkeypatch):
    """compare ran for minutes without a word: each cell is announced as [k/total]."""
    said: list[str] = []
    monkeypatch.setattr(compare_report, "run_matrix", lambda tasks, entries, options: (
        [options.progress(f"{e.name} on {t.name}") for e in entries for t in tasks],
        report["cells"])[1])  # fmt: skip
    compare([f"json={setup['json']}", f"word={setup['word']}"], [f"trained={setup['trained']}",
            f"random={setup['random']}"], device="cpu", progress=said.append)  # fmt: skip
    assert said[0] == "[1/6] base on json" and said[-1] == "[6/6] random on word" and len(said) == 6
