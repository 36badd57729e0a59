"""target_modules / exclude_modules / layers_to_transform / patterns, with PEFT's matching rules."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, build_bert, build_gpt2, build_llama

import deltatune as dt


def _targets(model, **kwargs):
    return list(dt.preview_targets(model, dt.LoraConfig(**kwargs)).targets)


def test_suffix_list_matches_at_dot_boundaries():
    names = _targets(build_llama(), target_modules=["q_proj", "v_proj"])
    assert len(names) == 4 and all(n.endswith(("self_attn.q_proj", "self_attn.v_proj")) for n in names)


def test_regex_is_fullmatch():
    model = build_llama()
    assert _targets(model, target_modules=r".*\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(dt.TargetingError, match="matches no module"):
        _targets(model, target_modules=r"q_proj")  # a partial match is not enough


def test_all_linear_skips_output_head_and_covers_conv1d():
    llama = _targets(build_llama(), target_modules="all-linear")
    assert len(llama) == 14 and "lm_head" not in llama
    gpt2 = dt.preview_targets(build_gpt2(), dt.LoraConfig(target_modules="all-linear"))
    assert set(gpt2.targets.values()) == {"Conv1D"} and len(gpt2.targets) == 8
    bert = _targets(build_bert(), target_modules="all-linear", modules_to_save=["classifier"])
    assert "classifier" not in bert and "bert.pooler.dense" in bert


def test_exclude_and_layers_to_transform():
    model = build_llama()
    names = _targets(
        model, target_modules="all-linear", exclude_modules=["down_proj", "o_proj"], layers_to_transform=[1]
    )
    assert len(names) == 5 and all(".layers.1." in n for n in names)
    assert not any(n.endswith(("down_proj", "o_proj")) for n in names)
    preview = dt.preview_targets(model, dt.LoraConfig(target_modules="all-linear", layers_to_transform=0))
    assert len(preview.skipped_by_layer) == 7
    assert "7 module(s) targeted" in str(preview) and "outside layers_to_transform: 7" in str(preview)


def test_typo_names_nearest_modules():
    with pytest.raises(dt.TargetingError, match=r"'q_prj' matches no module.*'q_proj'"):
        _targets(build_llama(), target_modules=["q_prj", "v_proj"])


def test_target_of_unsupported_type_is_named():
    with pytest.raises(dt.TargetingError, match="LlamaRMSNorm, which this method cannot wrap"):
        _targets(build_llama(), target_modules=["input_layernorm"])


def test_everything_excluded_is_an_error():
    with pytest.raises(dt.TargetingError, match="removed all of them"):
        _targets(build_llama(), target_modules=["q_proj"], exclude_modules=r".*q_proj")


def test_grouped_conv_is_refused_clearly():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(dt.TargetingError, match="groups=2"):
        dt.inject(model, dt.LoraConfig(target_modules=["0"]))


def test_rank_and_alpha_patterns():
    model = build_llama()
    config = dt.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    dt.inject(model, config)
    q1 = model.model.layers[1].self_attn.q_proj
    assert q1.lora_A["default"].weight.shape == (2, 32) and q1.scaling["default"] == 4.0
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0
    assert model.model.layers[0].self_attn.v_proj.scaling["default"] == 8.0


def test_rslora_scaling():
    model = build_llama()
    dt.inject(model, dt.LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4)


def test_trainable_summary_counts_and_bytes():
    model = build_llama()
    total = sum(p.numel() for p in model.parameters())
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    summary = dt.trainable_summary(model)
    expected = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # per layer: q (32->32), v (32->16)
    assert summary.trainable == expected and summary.trainable_bytes == expected * 4
    assert summary.total == total + expected
    assert f"{summary.percent:.4f}%" in str(summary)


def test_modules_to_save_trains_a_copy_and_keeps_original():
    case = CASES["bert"]
    model = case.build()
    original = model.classifier.weight.detach().clone()
    dt.inject(model, dt.LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    wrapper = model.classifier
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    assert torch.equal(wrapper.original_module.weight, original)


def test_pattern_verdicts_do_not_depend_on_the_clock(monkeypatch, tmp_path):
    """`convert --energy` writes an adapter with a rank_pattern key per module; under a wall-clock budget a
    busy machine refused it as "backtracking catastrophically". Here every clock reading moves 1,000 s on,
    as on the slowest machine imaginable: it loads all the same, with the same ranks, and a hostile pattern
    is refused all the same."""
    import itertools
    import re

    from deltatune.core import patterns
    from deltatune.core.errors import AdapterConfigError

    model = build_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    ranks = {re.escape(name): 1 + i % 3 for i, name in enumerate(names)}
    config = dt.LoraConfig(r=4, target_modules="all-linear", rank_pattern=ranks, init_lora_weights=False)
    clock = itertools.count(0.0, 1000.0)
    monkeypatch.setattr(patterns.time, "monotonic", lambda: next(clock))
    patterns.compiled.cache_clear()
    dt.inject(model, config)
    dt.save_adapter(model, tmp_path / "a")
    loaded = build_llama()
    dt.load_adapter(loaded, tmp_path / "a")
    got = {n: m.lora_A["default"].weight.shape[0] for n, m in loaded.named_modules() if hasattr(m, "lora_A")}
    assert len(ranks) >= 10 and got == {name: 1 + i % 3 for i, name in enumerate(names)}
    with pytest.raises(AdapterConfigError, match="cannot be matched in time linear"):
        _targets(build_llama(), target_modules="(.*){1,32000}[bc]")


def test_lookaround_patterns_match_as_python_re_does():
    """RE2 has no lookaround; such patterns (PEFT users write them to exclude towers) go to a backtracking
    matcher and match as `re.fullmatch` would."""
    import re

    model = build_llama()
    pattern = r"^(?!.*layers\.0).*\.(q|v)_proj$"
    expected = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    assert expected and _targets(model, target_modules=pattern) == expected


@pytest.mark.parametrize("build", [build_llama, build_gpt2, build_bert], ids=["llama", "gpt2", "bert"])
def test_a_minimal_lora_config_targets_what_peft_targets(build):
    """LoraConfig() with no target_modules works as PEFT's does (its defaults: r=8, lora_alpha=8, attention's
    query and value projections for the model type); PEFT is the oracle."""
    import peft

    ours = build()
    dt.inject(ours, dt.LoraConfig())
    theirs = peft.get_peft_model(build(), peft.LoraConfig())
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert set(dt.preview_targets(build(), dt.LoraConfig()).targets) == wrapped
    saved = dt.core.adapters.adapter_configs(ours)["default"]
    assert (saved.r, saved.lora_alpha) == (
        theirs.peft_config["default"].r,
        theirs.peft_config["default"].lora_alpha,
    )
    assert set(saved.target_modules) == set(theirs.peft_config["default"].target_modules)


def test_without_targets_a_model_with_no_attention_names_says_what_to_set():
    from conftest import build_cnn

    with pytest.raises(dt.TargetingError, match="target_modules is not set and SmallCNN .*'all-linear'"):
        dt.inject(build_cnn(), dt.LoraConfig())
