"""The trainer's forgetting monitor (`eval.forgetting`): the KL it logs is the KL of the kept weights against
the base, a budget keeps the best evaluation within it or stops the run at the first one over it, and a full
fine-tune is measured against the base recorded before its first step."""

from __future__ import annotations

import json

import pytest
from train_helpers import causal_config, instruction_rows, write_jsonl

from deltatune.task.kl import text_batches, token_divergence
from deltatune.train import train, validate_config
from deltatune.train.forgetting import ForgettingBudgetExceeded

GENERAL = ["the day was very good and the food was lovely", "my phone is so bad today", "a movie", "it is"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor")
    corpus = folder / "general.txt"
    corpus.write_text("\n".join(GENERAL * 3) + "\n")
    return write_jsonl(folder / "train.jsonl", instruction_rows(120, 0)), corpus


def _config(tiny_causal_lm, files, out, **forgetting):
    data, corpus = files
    raw = causal_config(tiny_causal_lm, data, out, max_steps=12, seed=0)
    raw["optim"]["lr"] = 2e-2
    raw["eval"] = {
        "every": 3,
        "forgetting": {"corpus": str(corpus), "texts": 12, "max_tokens": 16, **forgetting},
    }
    return raw


def _evals(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "validation"]


@pytest.fixture(scope="module")
def free_run(tiny_causal_lm, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("free") / "run"
    result = train(validate_config(_config(tiny_causal_lm, files, out)))
    return result, _evals(out)


def test_the_logged_kl_is_the_kept_adapters_kl_against_the_base(tiny_causal_lm, files, free_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt

    result, evals = free_run
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    assert all(r["forgetting_kl"] > 0 for r in evals)
    assert result.validation["forgetting_kl"] == next(
        r["forgetting_kl"] for r in evals if r["step"] == result.best_step
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    dt.load_adapter(model, result.saved_to)
    batches = text_batches(AutoTokenizer.from_pretrained(tiny_causal_lm), (GENERAL * 3)[:12], 16, 8)
    fresh = float(token_divergence(model, batches)["kl"].mean())
    assert fresh == pytest.approx(result.validation["forgetting_kl"], rel=1e-5)
    assert result.stop_reason is None


def _budget_between(evals):
    """A budget that some evaluations meet and some do not (the KL grows as training goes on)."""
    kls = sorted(r["forgetting_kl"] for r in evals)
    assert kls[0] < kls[-1]
    return (kls[0] + kls[1]) / 2 if kls[1] > kls[0] else (kls[0] + kls[-1]) / 2


def test_a_budget_keeps_the_best_evaluation_within_it(tiny_causal_lm, files, free_run, tmp_path):
    _, evals = free_run
    budget = _budget_between(evals)
    result = train(validate_config(_config(tiny_causal_lm, files, tmp_path / "run", budget=budget)))
    within = [r for r in evals if r["forgetting_kl"] <= budget]
    expected = min(within, key=lambda r: (r["loss"], r["step"]))  # metric: loss (lower is better)
    assert result.best_step == expected["step"] and result.steps == 12
    assert result.validation["forgetting_kl"] <= budget
    assert [r["forgetting_kl"] for r in _evals(tmp_path / "run")] == [r["forgetting_kl"] for r in evals]


@pytest.mark.slow
def test_over_budget_stop_ends_the_run_at_the_first_evaluation_over_it(
    tiny_causal_lm, files, free_run, tmp_path
):
    _, evals = free_run
    budget = _budget_between(evals)
    first_over = next(r["step"] for r in evals if r["forgetting_kl"] > budget)
    cfg = _config(tiny_causal_lm, files, tmp_path / "run", budget=budget, over_budget="stop")
    result = train(validate_config(cfg))
    assert result.steps == first_over and result.stop_reason == "forgetting budget"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "forgetting budget"


def test_a_budget_nothing_meets_keeps_nothing_and_says_so(tiny_causal_lm, files, tmp_path):
    cfg = _config(tiny_causal_lm, files, tmp_path / "run", budget=1e-12)
    with pytest.raises(ForgettingBudgetExceeded, match="no model was kept"):
        train(validate_config(cfg))
    assert not (tmp_path / "run" / "adapter").exists()
    assert len(_evals(tmp_path / "run")) == 4  # logged all the same


def test_a_full_fine_tune_is_measured_against_the_base_recorded_before_it(tiny_causal_lm, files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config(tiny_causal_lm, files, tmp_path / "run")
    cfg["adapter"] = {"method": "full"}
    cfg["optim"]["lr"] = 1e-3
    cfg["training"]["max_steps"] = 3
    result = train(validate_config(cfg))
    tuned = AutoModelForCausalLM.from_pretrained(result.saved_to).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    batches = text_batches(AutoTokenizer.from_pretrained(tiny_causal_lm), (GENERAL * 3)[:12], 16, 8)
    fresh = float(token_divergence(tuned, batches, reference=base)["kl"].mean())
    assert fresh > 0 and fresh == pytest.approx(result.validation["forgetting_kl"], rel=1e-4)
