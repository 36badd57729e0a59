"""`deltatune bench` (evaluate/latency*.py): every variant generates the same tokens as the unmerged adapter
where it should, the report's numbers are consistent with its own timings, bad input fails before anything
is written, and the CLI prints the table."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.evaluate.latency import Variant, _percentile, build_variants, summarize
from deltatune.evaluate.latency_report import measure_latency
from deltatune.evaluate.settings import LatencySettings


@pytest.fixture(scope="module")
def adapter(tiny_causal_lm, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    torch.manual_seed(0)
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return dt.save_adapter(model, tmp_path_factory.mktemp("bench") / "adapter")


SMALL = LatencySettings(batch_sizes=(1, 3), prompt_tokens=6, new_tokens=4, reps=2)


def test_merged_and_unmerged_variants_generate_the_same_tokens(tiny_causal_lm, adapter):
    from transformers import AutoModelForCausalLM

    from deltatune.runtime import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    variants = {v.name: v for v in build_variants(model, adapter, SMALL)}
    assert set(variants) == {"base", "unmerged", "merged", "quantized"}
    prompts = [[5, 6, 7, 8], [9, 10, 11]]

    def tokens(v: Variant):
        done = generate(
            v.model, prompts, [v.adapter] * 2, max_new_tokens=6, pad_token_id=0, eos_token_id=None
        )
        return [c.tokens for c in done]

    assert tokens(variants["merged"]) == tokens(variants["unmerged"]) != tokens(variants["base"])
    assert not any(isinstance(m, dt.core.layer.AdapterLayer) for m in variants["merged"].model.modules())
    quantized = variants["quantized"]
    assert quantized.skipped is None or "bitsandbytes" in quantized.skipped


def test_without_bitsandbytes_the_quantized_variant_is_skipped_with_the_reason(
    tiny_causal_lm, adapter, monkeypatch
):
    import sys

    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    (quantized,) = [v for v in build_variants(model, adapter, SMALL) if v.name == "quantized"]
    assert quantized.model is None and "pip install 'deltatune[quant]'" in quantized.skipped


@pytest.mark.slow
def test_the_report_is_consistent_with_its_timings(tiny_causal_lm, adapter, tmp_path):
    report = measure_latency(str(tiny_causal_lm), adapter, SMALL, out=tmp_path / "report", device="cpu")
    rows = [r for r in report["rows"] if "skipped" not in r]
    assert {(r["variant"], r["batch"]) for r in rows} >= {
        (v, b) for v in ("base", "unmerged", "merged") for b in (1, 3)
    }
    for r in rows:
        base = next(x for x in rows if x["variant"] == "base" and x["batch"] == r["batch"])
        first, request = r["first_token_all_s"], r["request_all_s"]
        assert len(first) == len(request) == 2 and min(first) > 0 and min(request) > 0
        per_token = sorted(
            (q - f) / 3 for q, f in zip(request, first, strict=True)
        )  # 4 new tokens: 3 after the first
        assert r["per_token_s"] == pytest.approx(sum(per_token) / 2)  # the median of two
        assert r["per_token_s_x_base"] == pytest.approx(r["per_token_s"] / base["per_token_s"])
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 4 / (sum(request) / 2))
        assert r["request_spread_s"] == [min(request), max(request)]
        assert min(request) <= r["request_p50_s"] <= r["request_p99_s"] <= max(request)
        assert r["weight_mib"] > 0
    merged = next(r for r in rows if r["variant"] == "merged")
    unmerged = next(r for r in rows if r["variant"] == "unmerged")
    assert merged["weight_mib"] < unmerged["weight_mib"]  # the plain model carries no adapter tensors
    assert report["adapter_load_s"]["median"] > 0
    saved = json.loads((tmp_path / "report" / "latency.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert saved["provenance"]["adapter_sha256"] and saved["provenance"]["hardware"]["cores"] >= 1
    assert (tmp_path / "report" / "latency.png").stat().st_size > 0
    assert "| merged | 1 |" in (tmp_path / "report" / "latency.md").read_text()


def test_percentiles_interpolate_between_order_statistics():
    assert _percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert _percentile([7.0], 99) == 7.0


def test_summarize_names_a_skipped_variant():
    settings = LatencySettings(batch_sizes=(1,), new_tokens=3, reps=1)
    base = Variant("base", torch.nn.Linear(1, 1), None, weight_bytes=8, working_mib=1.0)
    base.timings = {1: {"first_token_s": [0.1], "request_s": [0.3]}}
    skipped = Variant("quantized", None, None, skipped="needs the quant extra")
    report = summarize([base, skipped], settings, [0.02])
    assert report["rows"][1] == {"variant": "quantized", "skipped": "needs the quant extra"}
    assert (
        report["rows"][0]["per_token_s"] == pytest.approx(0.1)
        and report["rows"][0]["per_token_s_x_base"] == 1
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variants": ("unmerged",)}, "must include 'base'"),
        ({"variants": ("base", "fused")}, "unknown variants"),
        ({"new_tokens": 1}, "at least 2"),
        ({"batch_sizes": ()}, "batch sizes"),
    ],
)
def test_bad_settings_are_refused_before_anything_loads(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencySettings(**kwargs)


def test_a_missing_adapter_fails_and_writes_no_report(tiny_causal_lm, tmp_path):
    with pytest.raises(dt.AdapterNotFoundError, match="does not exist"):
        measure_latency(str(tiny_causal_lm), tmp_path / "nope", SMALL, out=tmp_path / "report")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dt.DeltatuneError, match="adapter_config.json"):
        measure_latency(str(tiny_causal_lm), tmp_path / "empty", SMALL, out=tmp_path / "report")
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(dt.AdapterNotFoundError, match="adapter_model.safetensors"):
        measure_latency(str(tiny_causal_lm), tmp_path / "empty", SMALL, out=tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_a_base_that_is_not_the_adapters_is_refused(tiny_causal_lm, adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_causal_lm).save_pretrained(tmp_path / "other")
    with pytest.raises(dt.BaseModelMismatchError):
        measure_latency(str(tmp_path / "other"), adapter, SMALL, out=tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_the_cli_prints_the_table(tiny_causal_lm, adapter, capsys):
    from deltatune.cli.main import main

    argv = ["bench", "--base", str(tiny_causal_lm), "--adapter", str(adapter), "--batch-sizes", "2",
            "--prompt-tokens", "5", "--new-tokens", "3", "--reps", "1", "--variants", "base", "unmerged", "merged"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| unmerged | 2 |" in out and "| merged | 2 |" in out and "adapter load + activate" in out
    assert (
        main(["bench", "--base", str(tiny_causal_lm), "--adapter", str(adapter), "--variants", "merged"]) == 2
    )


def test_a_report_whose_tail_says_the_machine_was_busy_warns():
    from deltatune.evaluate.latency import noisy_rows
    from deltatune.evaluate.latency_report import table

    quiet = {"variant": "base", "batch": 1, "request_p50_s": 1.0, "request_p99_s": 1.2}
    busy = {"variant": "unmerged", "batch": 4, "request_p50_s": 1.0, "request_p99_s": 1.6}
    assert noisy_rows([quiet, busy, {"variant": "4bit", "skipped": "no bitsandbytes"}]) == [
        "unmerged batch 4"
    ]
    assert noisy_rows([quiet]) == []
    report = {"settings": {"prompt_tokens": 8, "new_tokens": 4, "reps": 3}, "rows": [],
              "adapter_load_s": {"median": 0.1, "min": 0.1, "max": 0.1}, "noisy": ["unmerged batch 4"],
              "provenance": {"hardware": {"cpu": "x", "cores": 2, "torch_threads": 2, "device": "cpu"}}}  # fmt: skip
    assert "warning: the machine was busy while unmerged batch 4 ran" in table(report)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_packed_quantized_variant_reports_its_logit_error_against_the_float_adapter(
    tiny_causal_lm, adapter, scheme
):
    """`bench --quantize int8 | int4`: the quantized variant is `serve --quantize`'s packed bf16 base with the
    adapter on top, and the report says how far its next-token logits are from the float32 adapter's."""
    from transformers import AutoModelForCausalLM

    from deltatune.evaluate.latency import logit_errors
    from deltatune.runtime.weight_only import PackedLinear

    settings = LatencySettings(batch_sizes=(1, 3), prompt_tokens=6, new_tokens=4, reps=1, quantize=scheme)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    variants = build_variants(model, adapter, settings)
    quantized = next(v for v in variants if v.name == "quantized")
    assert quantized.skipped is None
    assert any(isinstance(m, PackedLinear) for m in quantized.model.modules())
    errors = logit_errors(variants, settings, torch.device("cpu"), model.config.vocab_size)
    assert set(errors) == {"merged", "quantized"}
    assert errors["merged"]["max_abs"] < 1e-4 and errors["merged"]["top1_agreement"] == 1.0
    assert 0 < errors["quantized"]["mean_abs"] <= errors["quantized"]["max_abs"]
    assert errors["quantized"]["max_abs"] > 100 * errors["merged"]["max_abs"]
    assert 0 <= errors["quantized"]["top1_agreement"] <= 1


def test_an_unknown_quantized_base_is_refused():
    with pytest.raises(ValueError, match=r"quantize 'int2' is not one of nf4, int8, int4"):
        LatencySettings(quantize="int2")
