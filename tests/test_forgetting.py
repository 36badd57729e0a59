"""`deltatune forgetting` (evaluate/forgetting*.py): the base against itself and a disabled adapter score
exactly 0, a destructive adapter scores high, the KL is the textbook one, a recorded base equals a live one,
and bad corpora fail before anything is written."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.data.readers import DataError
from deltatune.evaluate.forgetting import (
    ForgettingSettings,
    forgetting_metrics,
    record_log_probs,
    text_batches,
    token_divergence,
)
from deltatune.evaluate.forgetting_report import measure_forgetting

TEXTS = [
    "the movie was great and the acting was wonderful",
    "a terrible boring film with an awful plot",
    "the weather is fine today and people walk outside",
    "sentiment of the user is positive",
    "nothing happened at all",
] * 2
PROMPTS = ["the movie was", "a terrible", "the weather is"]
SMALL = ForgettingSettings(texts=10, max_tokens=16, prompts=3, new_tokens=4, batch_size=4)


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _with_lora(folder, scale: float = 0.0, seed: int = 0):
    """The tiny model with a LoRA on every linear layer whose B is `scale` * N(0, 1) (0: the identity)."""
    model = _model(folder)
    torch.manual_seed(seed)
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


def _is_zero(metrics):
    t = metrics["text"]
    assert t["kl_mean"] == 0.0 and t["kl_p95"] == 0.0
    assert t["perplexity_base"] == t["perplexity_adapted"] and t["perplexity_ratio"] == 1.0
    a = metrics["answers"]
    assert a["changed_share"] == a["first_token_changed_share"] == 0.0 and a["examples"] == []
    assert a["kept_prefix_share"] == 1.0


def test_the_base_against_itself_is_exactly_zero(tiny_causal_lm):
    model, tok = _model(tiny_causal_lm), _tokenizer(tiny_causal_lm)
    said: list[str] = []
    metrics, kl = forgetting_metrics(
        model, tok, TEXTS, PROMPTS, reference=model, settings=SMALL, progress=said.append
    )
    _is_zero(metrics)
    assert kl.numel() == metrics["text"]["tokens"] > 20
    batches = -(-min(len(TEXTS), SMALL.texts) // SMALL.batch_size)  # it said what it ran, as it started
    assert said == [
        f"[{i}/{batches}] scoring text batches with both models" for i in range(1, batches + 1)
    ] + ["answering 3 general prompts with both models"]


def test_a_disabled_or_identity_adapter_is_exactly_zero(tiny_causal_lm):
    tok = _tokenizer(tiny_causal_lm)
    identity = _with_lora(tiny_causal_lm, scale=0.0)
    _is_zero(forgetting_metrics(identity, tok, TEXTS, PROMPTS, settings=SMALL)[0])
    trained = _with_lora(tiny_causal_lm, scale=0.5)
    with dt.disable_adapter(trained):
        _is_zero(forgetting_metrics(trained, tok, TEXTS, PROMPTS, settings=SMALL)[0])


def test_a_destructive_adapter_scores_high_and_a_mild_one_low(tiny_causal_lm):
    tok = _tokenizer(tiny_causal_lm)
    mild = forgetting_metrics(_with_lora(tiny_causal_lm, scale=0.01), tok, TEXTS, PROMPTS, settings=SMALL)[0]
    wild = forgetting_metrics(_with_lora(tiny_causal_lm, scale=3.0), tok, TEXTS, PROMPTS, settings=SMALL)[0]
    assert 0 < mild["text"]["kl_mean"] < 0.05
    assert wild["text"]["kl_mean"] > 1.0 and wild["text"]["kl_p95"] >= wild["text"]["kl_mean"] / 2
    # the tiny random base predicts nothing (perplexity ~ its vocabulary), so the direction is not meaningful
    assert abs(math.log(wild["text"]["perplexity_ratio"])) > 0.1
    assert wild["answers"]["changed_share"] >= 2 / 3
    assert wild["answers"]["kept_prefix_share"] < mild["answers"]["kept_prefix_share"]
    assert wild["answers"]["examples"][0]["base"] != wild["answers"]["examples"][0]["adapted"]


def test_kept_prefix_share():
    from deltatune.evaluate.forgetting import _kept_prefix

    assert _kept_prefix([1, 2, 3, 4], [1, 2, 9, 9]) == 0.5 and _kept_prefix([1, 2], [1, 2]) == 1.0
    assert _kept_prefix([7], [1, 2]) == 0.0 and _kept_prefix([], []) == 1.0 and _kept_prefix([1], []) == 0.0


def test_kl_and_perplexity_are_the_textbook_ones(tiny_causal_lm):
    model, tok = _with_lora(tiny_causal_lm, scale=0.3), _tokenizer(tiny_causal_lm)
    batches = text_batches(tok, TEXTS[:3], 16, 3)
    scores = token_divergence(model, batches)
    ids = batches[0]["input_ids"]
    keep = batches[0]["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        adapted = F.log_softmax(model(**batches[0]).logits[:, :-1].float(), -1)[keep]
        with dt.disable_adapter(model):
            base = F.log_softmax(model(**batches[0]).logits[:, :-1].float(), -1)[keep]
    expected = F.kl_div(adapted, base, log_target=True, reduction="none").sum(-1)  # KL(base || adapted)
    torch.testing.assert_close(scores["kl"], expected, rtol=1e-5, atol=1e-6)
    targets = ids[:, 1:][keep]
    torch.testing.assert_close(scores["nll_base"], F.nll_loss(base, targets, reduction="none"))


def test_a_recorded_base_equals_a_live_reference(tiny_causal_lm):
    """The trainer's monitor for full fine-tuning records the base's log-probabilities before training."""
    base, tok = _model(tiny_causal_lm), _tokenizer(tiny_causal_lm)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = text_batches(tok, TEXTS, 16, 4)
    live = token_divergence(tuned, batches, reference=base)
    recorded = token_divergence(tuned, batches, base_log_probs=record_log_probs(base, batches))
    for key in live:
        torch.testing.assert_close(live[key], recorded[key])
    assert float(live["kl"].mean()) > 0


def test_a_model_without_adapters_needs_a_reference(tiny_causal_lm):
    model, tok = _model(tiny_causal_lm), _tokenizer(tiny_causal_lm)
    with pytest.raises(ValueError, match="no adapters to disable"):
        forgetting_metrics(model, tok, TEXTS, PROMPTS, settings=SMALL)


@pytest.fixture(scope="module")
def adapter_dir(tiny_causal_lm, tmp_path_factory):
    return dt.save_adapter(
        _with_lora(tiny_causal_lm, scale=0.3), tmp_path_factory.mktemp("forget") / "adapter"
    )


def test_the_report_folder_and_the_cli(tiny_causal_lm, adapter_dir, tmp_path, capsys):
    corpus = tmp_path / "general.txt"
    corpus.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "report"
    report = measure_forgetting(str(tiny_causal_lm), adapter_dir, corpus=corpus, settings=SMALL, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["forgetting.json", "forgetting.md", "forgetting.png"]
    saved = json.loads((out / "forgetting.json").read_text())
    assert saved["text"] == report["text"] and saved["text"]["kl_mean"] > 0
    prov = saved["provenance"]
    assert len(prov["adapter_sha256"]) == len(prov["corpus_sha256"]) == 64
    assert {"cpu", "cores", "device"} <= set(prov["hardware"]) and "torch" in json.dumps(prov["environment"])
    from deltatune.cli.main import main

    args = ["forgetting", "--base", str(tiny_causal_lm), "--adapter", str(adapter_dir), "--corpus", str(corpus),
            "--texts", "10", "--max-tokens", "16", "--prompts", "2", "--new-tokens", "3"]  # fmt: skip
    assert main(args) == 0
    assert f"{report['text']['kl_mean']:.4f} nats" in capsys.readouterr().out  # same numbers from the CLI


def test_a_fully_fine_tuned_model_is_compared_with_its_base(tiny_causal_lm, tmp_path):
    tuned = _model(tiny_causal_lm)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.2 * torch.randn_like(tuned.lm_head.weight))
    tuned.save_pretrained(tmp_path / "full")
    _tokenizer(tiny_causal_lm).save_pretrained(tmp_path / "full")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    report = measure_forgetting(str(tiny_causal_lm), model=tmp_path / "full", corpus=corpus, settings=SMALL)
    assert report["text"]["kl_mean"] > 0.001 and len(report["provenance"]["model_sha256"]) == 64


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"\n  \n", "holds no text"), ("caf\xe9 au lait\n".encode("latin-1"), "not UTF-8"),
     (b'{"body": "x"}\n', "no `text` column")],
)  # fmt: skip
def test_bad_corpora_fail_clearly_and_write_nothing(tiny_causal_lm, adapter_dir, tmp_path, content, match):
    corpus = tmp_path / ("c.jsonl" if content.startswith(b"{") else "c.txt")
    corpus.write_bytes(content)
    out = tmp_path / "report"
    with pytest.raises(DataError, match=match):
        measure_forgetting(str(tiny_causal_lm), adapter_dir, corpus=corpus, settings=SMALL, out=out)
    assert not out.exists()


def test_exactly_one_subject_and_an_adapter_folder_that_is_one(tiny_causal_lm, adapter_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text here\n")
    with pytest.raises(ValueError, match="exactly one"):
        measure_forgetting(str(tiny_causal_lm), adapter_dir, model=tiny_causal_lm, corpus=corpus)
    with pytest.raises(dt.core.errors.AdapterNotFoundError, match="is this an adapter folder"):
        measure_forgetting(str(tiny_causal_lm), tmp_path, corpus=corpus)


def test_an_adapter_for_another_base_is_refused_before_anything_is_written(tiny_causal_lm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    dt.inject(other, dt.LoraConfig(r=2, target_modules="all-linear"))
    foreign = dt.save_adapter(other, tmp_path / "foreign")
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text here\n")
    with pytest.raises(dt.BaseModelMismatchError):
        measure_forgetting(str(tiny_causal_lm), foreign, corpus=corpus, out=tmp_path / "report")
    assert not (tmp_path / "report").exists()
