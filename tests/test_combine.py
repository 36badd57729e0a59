"""Adapter arithmetic and conversion (deltatune.combine): every result is checked against a dense reference
built here from each source's merged weights (merge, then W' - W), a path independent of combine's own."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CASES, build_gpt2, build_llama
from safetensors.torch import load_file

import deltatune as dt
from deltatune.combine import combine_adapters, convert_adapter
from deltatune.combine.arithmetic import disjoint_mean, elect_sign, trim
from deltatune.core.adapters import adapter_layers
from deltatune.core.errors import CombineError

IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
TOL = {"atol": 2e-5, "rtol": 1e-4}


def _save(model, config, folder):
    dt.inject(model, config, "a")
    dt.save_adapter(model, folder, "a")
    dt.eject(model, merge=False)
    return folder


def _lora(r=4, alpha=8, targets=("q_proj", "v_proj"), **kw):
    return dt.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **kw)


def _reference_deltas(model, folder) -> dict[str, torch.Tensor]:
    """{module: W' - W} with the adapter merged, in the base weight's own layout."""
    dt.load_adapter(model, folder, "ref")
    layers = dict(adapter_layers(model))
    before = {n: layer.base_weight.detach().clone() for n, layer in layers.items()}
    dt.merge(model)
    deltas = {n: layer.base_weight.detach() - before[n] for n, layer in layers.items()}
    dt.eject(model, merge=False)
    with torch.no_grad():  # unmerging is not bit-exact; the next adapter's base check needs the exact base
        for name, layer in layers.items():
            layer.base_weight.copy_(before[name])
    return deltas


def _result_deltas(model, folder) -> dict[str, torch.Tensor]:
    return _reference_deltas(model, folder)


def _logits(model, folder=None):
    if folder is not None:
        dt.load_adapter(model, folder, "x")
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    if folder is not None:
        dt.eject(model, merge=False)
    return out


@pytest.fixture
def llama_sources(tmp_path):
    """A plain LoRA (q, v), an rsLoRA with alpha_pattern and rank_pattern (v, down): different target sets."""
    model = build_llama()
    first = _save(model, _lora(), tmp_path / "first")
    torch.manual_seed(1)
    second = _save(
        model,
        _lora(r=2, alpha=4, targets=("v_proj", "down_proj"), use_rslora=True,
              alpha_pattern={"down_proj": 16}, rank_pattern={"layers.1.mlp.down_proj": 3}),
        tmp_path / "second",
    )  # fmt: skip
    return model, first, second


def _weighted_reference(model, folders, weights, rule):
    refs = [_reference_deltas(model, f) for f in folders]
    names = sorted(set().union(*refs))
    out = {}
    for name in names:
        shape = next(r[name].shape for r in refs if name in r)
        parts = [w * r.get(name, torch.zeros(shape)) for r, w in zip(refs, weights, strict=True)]
        out[name] = rule(parts)
    return out


def _full_rank(model):
    return max(min(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_linear_equals_the_weighted_sum_of_deltas_over_the_union_of_targets(llama_sources, tmp_path):
    model, first, second = llama_sources
    weights = [1.0, -0.7]  # a negative weight: task negation
    report = combine_adapters(
        model, [first, second], tmp_path / "out", weights=weights, method="linear", rank=6
    )
    expected = _weighted_reference(model, [first, second], weights, sum)
    got = _result_deltas(model, tmp_path / "out")
    assert sorted(got) == sorted(expected)  # union: q (first only), v (both), down (second only)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]  # short names select exactly these
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL)
    assert report.max_relative_error < 1e-5 and report.logits["max_abs_error"] < 1e-4
    assert report.logits["exact_max_abs_effect"] > 0.05  # the combination moves the logits; the error is tiny


def test_cat_is_exact_at_the_summed_rank_and_equals_peft(llama_sources, tmp_path):
    peft = pytest.importorskip("peft")
    model, first, second = llama_sources
    report = combine_adapters(model, [first, second], tmp_path / "cat", weights=[1.0, 0.5], method="cat")
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert (config["use_rslora"], config["use_dora"], config["alpha_pattern"]) == (False, False, {})
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 4 + 2
    assert report.ranks["model.layers.1.mlp.down_proj"] == 3
    ours = _result_deltas(model, tmp_path / "cat")
    # PEFT's cat on the same two adapters, loaded as PEFT loads them
    pm = peft.PeftModel.from_pretrained(build_llama(), first, adapter_name="first")
    pm.load_adapter(second, adapter_name="second")
    pm.add_weighted_adapter(["first", "second"], [1.0, 0.5], "cat", combination_type="cat")
    for name, delta in ours.items():
        layer = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.get_delta_weight("cat"), delta, **TOL)


def test_peft_linear_adds_cross_terms_that_ours_does_not(tmp_path):
    """Documents peft#3004: PEFT's `linear` mixes the factors, (Σ √(w_i s_i) B_i)(Σ √(w_i s_i) A_i), so it
    adds B_i A_j for i != j. Ours is Σ w_i s_i B_i A_i, and at a rank that cannot hold it, the best
    approximation of that, which PEFT's `svd` (fixed since peft#3111) agrees with."""
    peft = pytest.importorskip("peft")
    model = build_llama()
    first = _save(model, _lora(targets=("v_proj",)), tmp_path / "a")
    torch.manual_seed(2)
    second = _save(model, _lora(alpha=16, targets=("v_proj",)), tmp_path / "b")
    weights = [1.0, 0.5]
    exact = _weighted_reference(model, [first, second], weights, sum)
    combine_adapters(model, [first, second], tmp_path / "ours", weights=weights, method="linear", rank=4)
    ours = _result_deltas(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(build_llama(), first, adapter_name="a")
    pm.load_adapter(second, adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], weights, "lin", combination_type="linear")
    pm.add_weighted_adapter(["a", "b"], weights, "svd", combination_type="svd", svd_rank=4)
    name = "model.layers.0.self_attn.v_proj"
    layer = pm.base_model.model.get_submodule(name)
    theirs = layer.get_delta_weight("lin")
    mixed_a = sum(
        math.sqrt(w * layer.scaling[n]) * layer.lora_A[n].weight for w, n in zip(weights, "ab", strict=True)
    )
    mixed_b = sum(
        math.sqrt(w * layer.scaling[n]) * layer.lora_B[n].weight for w, n in zip(weights, "ab", strict=True)
    )
    torch.testing.assert_close(theirs, mixed_b @ mixed_a, **TOL)  # the cross-term formula, exactly
    assert (theirs - exact[name]).norm() > 0.5 * exact[name].norm()  # ... which is far from the sum
    u, s, vh = torch.linalg.svd(exact[name].double())
    best = ((u[:, :4] * s[:4]) @ vh[:4]).float()
    torch.testing.assert_close(ours[name], best, **TOL)  # rank 4 of a rank-8 sum: the best rank-4 one
    torch.testing.assert_close(layer.get_delta_weight("svd"), best, **TOL)


def _ties_rule(density, sign_rule="total"):
    def rule(parts):
        trimmed = []
        for p in parts:
            keep = math.ceil(density * p.numel())
            order = p.abs().flatten().argsort(descending=True, stable=True)[:keep]
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[order] = True
            trimmed.append(p * mask.view_as(p))
        stacked = torch.stack(trimmed)
        votes = stacked.sum(0) if sign_rule == "total" else stacked.sign().sum(0)
        agree = (stacked.sign() == votes.sign()) & (stacked != 0)
        return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)

    return rule


@pytest.mark.parametrize("sign_rule", ["total", "frequency"])
def test_ties_matches_the_paper_on_dense_deltas(llama_sources, tmp_path, sign_rule):
    model, first, second = llama_sources
    full = _full_rank(model)
    report = combine_adapters(
        model, [first, second], tmp_path / "ties", weights=[1.0, 2.0], method="ties",
        density=0.3, sign_rule=sign_rule, rank=full,
    )  # fmt: skip
    expected = _weighted_reference(model, [first, second], [1.0, 2.0], _ties_rule(0.3, sign_rule))
    got = _result_deltas(model, tmp_path / "ties")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL)
    assert report.max_relative_error < 1e-5
    record = json.loads((tmp_path / "ties" / "deltatune.json").read_text())["derived_from"]
    assert record["parameters"] == {
        "weights": [1.0, 2.0], "rank": full, "energy": None, "density": 0.3, "seed": 0, "sign_rule": sign_rule,
    }  # fmt: skip


def test_magnitude_prune_keeps_the_largest_entries_of_each_weighted_delta(llama_sources, tmp_path):
    model, first, second = llama_sources
    full = _full_rank(model)
    combine_adapters(
        model, [first, second], tmp_path / "mp", method="magnitude_prune", density=0.2, rank=full
    )
    expected = _weighted_reference(
        model, [first, second], [1.0, 1.0], lambda parts: sum(trim(p, 0.2) for p in parts)
    )
    got = _result_deltas(model, tmp_path / "mp")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL)
    only_first = got["model.layers.0.self_attn.q_proj"]  # one source: exactly the kept share survives
    survivors = int((only_first.abs() > 1e-4 * only_first.abs().max()).sum())
    assert survivors == math.ceil(0.2 * only_first.numel())


def test_dare_is_seeded_unbiased_and_reduces_to_linear_at_density_one(llama_sources, tmp_path):
    model, first, second = llama_sources
    full = _full_rank(model)
    run = lambda out, **kw: combine_adapters(model, [first, second], tmp_path / out, rank=full, **kw)  # noqa: E731
    run("d1", method="dare_linear", density=0.5, seed=7)
    run("d2", method="dare_linear", density=0.5, seed=7)
    run("d3", method="dare_linear", density=0.5, seed=8)
    run("lin", method="linear")
    run("dense", method="dare_linear", density=1.0)
    weights = {k: load_file(tmp_path / k / "adapter_model.safetensors") for k in ("d1", "d2", "d3")}
    assert all(torch.equal(weights["d1"][k], weights["d2"][k]) for k in weights["d1"])  # same seed, same file
    assert not all(torch.equal(weights["d1"][k], weights["d3"][k]) for k in weights["d1"])
    linear = _result_deltas(model, tmp_path / "lin")
    dense = _result_deltas(model, tmp_path / "dense")
    for name in linear:
        torch.testing.assert_close(dense[name], linear[name], **TOL)
    # Dropped entries are gone and survivors doubled: over many entries, the mean is kept (unbiased).
    name = "model.layers.0.self_attn.q_proj"  # only in `first`, so the result is that delta with DARE applied
    dropped = _result_deltas(model, tmp_path / "d1")[name]
    kept = dropped.abs() > 1e-4 * dropped.abs().max()  # a full-rank SVD leaves ~1e-9 where entries dropped
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(dropped[kept], 2 * linear[name][kept], **TOL)


def test_rank_and_energy_truncation_report_the_error_they_leave(llama_sources, tmp_path):
    model, first, second = llama_sources
    exact = _weighted_reference(model, [first, second], [1.0, 1.0], sum)
    report = combine_adapters(model, [first, second], tmp_path / "r2", method="svd", rank=2)
    got = _result_deltas(model, tmp_path / "r2")
    for name, delta in exact.items():
        measured = float((got[name] - delta).norm() / delta.norm())
        assert report.relative_errors[name] == pytest.approx(measured, rel=1e-3, abs=1e-6)
    assert report.max_relative_error > 0.1 and report.logits["max_abs_error"] > 1e-4
    assert set(report.ranks.values()) == {2}
    energy = combine_adapters(model, [first, second], tmp_path / "e", method="linear", energy=0.9)
    record = json.loads((tmp_path / "e" / "deltatune.json").read_text())["derived_from"]
    for name, kept in record["energy_kept"].items():
        assert kept >= 0.9 - 1e-9
        assert energy.relative_errors[name] == pytest.approx(math.sqrt(1 - kept), abs=1e-6)
    assert len(set(energy.ranks.values())) > 1  # ranks differ per module: written as rank_pattern


def test_the_result_is_a_peft_adapter_with_provenance(llama_sources, tmp_path):
    peft = pytest.importorskip("peft")
    model, first, second = llama_sources
    combine_adapters(model, [first, second], tmp_path / "out", method="linear", energy=0.95)
    ours = _logits(model, tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(build_llama(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, ours, **TOL)
    record = json.loads((tmp_path / "out" / "deltatune.json").read_text())["derived_from"]
    first_record = json.loads((first / "deltatune.json").read_text())
    assert record["method"] == "linear"
    assert record["sources"][0]["sha256"] == first_record["files"]["adapter_model.safetensors"]["sha256"]
    assert record["sources"][1]["use_rslora"] is True
    assert record["logits"]["max_abs_error"] >= 0


@pytest.mark.parametrize(
    "config",
    [
        _lora(r=3, alpha=5, use_dora=True),
        _lora(r=2, alpha=4, use_rslora=True, alpha_pattern={"q_proj": 3.0}),
        dt.Ia3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
        dt.BottleneckConfig(placement="feedforward", non_linearity="identity", bottleneck_size=4, use_bias=False, init_weights=False),
    ],
    ids=["dora", "rslora-alpha_pattern", "ia3", "linear-bottleneck"],
)  # fmt: skip
def test_convert_gives_a_plain_lora_with_the_same_outputs(tmp_path, config):
    model = build_llama()
    source = _save(model, config, tmp_path / "source")
    expected = _logits(model, source)
    dense = not isinstance(config, dt.LoraConfig) or config.use_dora
    rank = _full_rank(model) if dense else None  # a plain LoRA keeps its own factors, exactly
    report = convert_adapter(model, source, tmp_path / "plain", rank=rank)
    config_out = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config_out["peft_type"] == "LORA" and not config_out["use_dora"] and not config_out["use_rslora"]
    assert config_out["alpha_pattern"] == {} and config_out["lora_alpha"] == config_out["r"]
    torch.testing.assert_close(_logits(model, tmp_path / "plain"), expected, **TOL)
    assert report.max_relative_error < 1e-5 and report.logits["max_abs_error"] < 1e-4
    assert not torch.allclose(expected, _logits(model), atol=1e-3)  # the adapter does something


def test_convert_on_a_quantized_base_uses_the_dequantized_reference(tmp_path):
    pytest.importorskip("bitsandbytes")
    from deltatune.quant import quantize_base

    model = quantize_base(build_llama(), 4)
    source = _save(model, _lora(r=2, alpha=4, use_dora=True), tmp_path / "qdora")
    expected = _logits(model, source)
    report = convert_adapter(model, source, tmp_path / "plain", rank=32)
    torch.testing.assert_close(_logits(model, tmp_path / "plain"), expected, atol=1e-4, rtol=1e-4)
    assert report.logits["max_abs_error"] < 1e-4


def test_convert_to_an_energy_threshold(tmp_path):
    model = build_llama()
    source = _save(model, _lora(r=3, alpha=5, use_dora=True), tmp_path / "dora")
    report = convert_adapter(model, source, tmp_path / "e", energy=0.999)
    assert all(rank <= 8 for rank in report.ranks.values())  # DoRA's ΔW is far from full rank
    assert report.max_relative_error <= math.sqrt(1 - 0.999) + 1e-6


def test_modules_to_save_are_refused_or_split_into_a_side_file(tmp_path):
    model = CASES["bert"].build()
    config = dt.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"],
        init_lora_weights=False, task_type="SEQ_CLS",
    )  # fmt: skip
    dt.inject(model, config, "a")
    with torch.no_grad():
        model.classifier.modules_to_save["a"].weight.add_(1.0)
    inputs = CASES["bert"].inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    dt.save_adapter(model, tmp_path / "cls", "a")
    dt.eject(model, merge=False)
    with pytest.raises(CombineError, match="modules_to_save"):
        convert_adapter(model, tmp_path / "cls", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    convert_adapter(model, tmp_path / "cls", tmp_path / "split", modules_to_save="split")
    side = load_file(tmp_path / "split" / "modules_to_save.safetensors")
    assert sorted(side) == ["classifier.bias", "classifier.weight"]
    assert json.loads((tmp_path / "split" / "adapter_config.json").read_text())["modules_to_save"] is None
    model.load_state_dict(side, strict=False)  # the documented use: into the base, then the LoRA
    dt.load_adapter(model, tmp_path / "split")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, **TOL)


def test_what_has_no_exact_delta_is_refused_with_the_reason_and_nothing_is_written(tmp_path):
    model = build_llama()
    lora = _save(model, _lora(), tmp_path / "lora")
    prompt = _save(
        model, dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), tmp_path / "prompt"
    )
    relu = _save(
        model,
        dt.BottleneckConfig(placement="feedforward", non_linearity="relu", bottleneck_size=4),
        tmp_path / "relu",
    )
    with pytest.raises(CombineError, match="no exact weight delta: prompt tuning"):
        combine_adapters(model, [lora, prompt], tmp_path / "a", rank=4)
    with pytest.raises(CombineError, match="relu"):
        combine_adapters(model, [lora, relu], tmp_path / "b", rank=4)
    dora = _save(model, _lora(use_dora=True), tmp_path / "dora")
    with pytest.raises(CombineError, match="cat concatenates LoRA factors"):
        combine_adapters(model, [lora, dora], tmp_path / "c", method="cat")
    with pytest.raises(CombineError, match="density"):
        combine_adapters(model, [lora, lora], tmp_path / "d", method="ties", density=0)
    with pytest.raises(CombineError, match="one weight per adapter"):
        combine_adapters(model, [lora, lora], tmp_path / "e", weights=[1.0])
    assert not any((tmp_path / x).exists() for x in "abcde")
    assert not list(adapter_layers(model))  # the model is left bare after a refusal too


def test_ia3_that_rescales_a_bias_is_refused():
    model = build_gpt2()
    dt.inject(model, dt.Ia3Config(target_modules=["c_attn"], init_ia3_weights=False), "a")
    from deltatune.combine.deltas import adapter_deltas

    with pytest.raises(CombineError, match="bias"):
        adapter_deltas(model, "a")


def test_sign_election_and_disjoint_mean_by_hand():
    a = torch.tensor([3.0, -1.0, 0.0, 2.0])
    b = torch.tensor([-1.0, -1.0, 5.0, -3.0])
    c = torch.tensor([-1.0, 4.0, 0.0, 0.0])
    assert elect_sign([a, b, c], "total").tolist() == [1.0, 1.0, 1.0, -1.0]
    assert elect_sign([a, b, c], "frequency").tolist() == [-1.0, -1.0, 1.0, 0.0]
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0])
    assert disjoint_mean([a, b, c], sign).tolist() == [3.0, 4.0, 5.0, -3.0]
    assert trim(torch.tensor([0.1, -5.0, 2.0, 2.0]), 0.5).tolist() == [0.0, -5.0, 2.0, 0.0]


def test_a_model_that_carries_adapters_is_refused(llama_sources, tmp_path):
    model, first, second = llama_sources
    dt.inject(model, _lora(), "mine")
    with pytest.raises(CombineError, match="bare base model"):
        combine_adapters(model, [first, second], tmp_path / "out")
    assert "mine" in dt.adapter_configs(model)  # the caller's adapter is left alone


def test_cli_combine_convert_and_export(llama_sources, tmp_path, capsys):
    from deltatune.cli.main import main

    model, first, second = llama_sources
    model.save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    assert main(["combine", str(first), str(second), "--base", base, "--out", str(tmp_path / "c"),
                 "--method", "ties", "--density", "0.5", "--rank", "8", "--weights", "1", "0.5"]) == 0  # fmt: skip
    said = capsys.readouterr()
    assert "ties, r=8" in said.out and "MiB (from " in said.out
    record = json.loads((tmp_path / "c" / "deltatune.json").read_text())["derived_from"]
    assert record["parameters"]["weights"] == [1.0, 0.5] and record["parameters"]["density"] == 0.5
    assert main(["inspect", str(tmp_path / "c")]) == 0
    assert "derived from: ties of " in capsys.readouterr().out
    assert main(["convert", "--base", base, "--adapter", str(second), "--out", str(tmp_path / "p"),
                 "--no-logit-check"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "p" / "deltatune.json").read_text())["derived_from"]["logits"] is None
    torch.testing.assert_close(_logits(model, tmp_path / "p"), _logits(model, second), **TOL)
    assert (
        main(["export", "--base", base, "--adapter", str(tmp_path / "p"), "--out", str(tmp_path / "m")]) == 0
    )
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["combine", str(first), "--base", base, "--out", str(tmp_path / "x")]) == 2
    assert "at least two adapters" in capsys.readouterr().err
    # rank 1 for two adapters of ranks 2-4: much of each module's update is lost, and that is said
    assert main(["combine", str(first), str(second), "--base", base, "--out", str(tmp_path / "r1"),
                 "--method", "ties", "--rank", "1", "--no-logit-check"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: at these ranks" in err and "off their exact update by over 10%" in err
    # rank 64 for the same: bigger than what it was made from, and that is said too
    assert main(["combine", str(first), str(second), "--base", base, "--out", str(tmp_path / "r64"),
                 "--rank", "64", "--no-logit-check"]) == 0  # fmt: skip
    said = capsys.readouterr()
    assert "warning: the written adapter is" in said.err and "warning: at these ranks" not in said.err


def test_dora_and_ia3_combine_with_lora_through_their_exact_deltas(llama_sources, tmp_path):
    model, first, _ = llama_sources
    dora = _save(model, _lora(r=2, alpha=4, use_dora=True, targets=("q_proj", "o_proj")), tmp_path / "dora")
    ia3 = _save(
        model,
        dt.Ia3Config(
            target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"], init_ia3_weights=False
        ),
        tmp_path / "ia3",
    )
    weights = [1.0, 0.5, -0.3]
    combine_adapters(model, [first, dora, ia3], tmp_path / "mix", weights=weights, rank=_full_rank(model))
    expected = _weighted_reference(model, [first, dora, ia3], weights, sum)
    got = _result_deltas(model, tmp_path / "mix")
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL)


def test_a_subset_of_layers_is_written_with_full_module_names(tmp_path):
    model = build_llama()
    source = _save(model, _lora(targets=("model.layers.1.self_attn.q_proj",)), tmp_path / "one")
    convert_adapter(model, source, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(_logits(model, tmp_path / "plain"), _logits(model, source), **TOL)
