"""LoRA on fused mixture-of-experts parameters (PEFT's target_parameters), on tiny random Qwen3-MoE, Mixtral,
gpt-oss (experts stored transposed, with biases), OLMoE and Qwen2-MoE (a shared expert beside the routed ones).

PEFT 0.21.2 is the oracle for the format and the forward: an adapter deltatune saves loads in PEFT with the same
logits, and PEFT's own all-linear adapter (which adapts the experts and the router) loads in deltatune with the
same logits. The model with two adapters active at once is the oracle for combining them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.core.capabilities import Capability, capability_refusal
from deltatune.core.errors import AdapterConfigError, AdapterFormatError, TargetingError
from deltatune.core.layer import AdapterLayer

peft = pytest.importorskip("peft")
TOL = {"atol": 1e-5, "rtol": 1e-5}
SIZES = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_experts_per_tok": 2}  # fmt: skip


def moe(kind: str = "qwen3_moe", experts: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **SIZES, intermediate_size=48, moe_intermediate_size=16, num_experts=experts, head_dim=8
        )
        return tf.Qwen3MoeForCausalLM(config).eval()
    if kind == "mixtral":
        config = tf.MixtralConfig(**SIZES, intermediate_size=16, num_local_experts=experts, head_dim=8)
        return tf.MixtralForCausalLM(config).eval()
    if kind == "gpt_oss":
        config = tf.GptOssConfig(**SIZES, intermediate_size=16, num_local_experts=experts, head_dim=8,
                                 layer_types=["sliding_attention", "full_attention"])  # fmt: skip
        return tf.GptOssForCausalLM(config).eval()
    if kind == "olmoe":
        config = tf.OlmoeConfig(
            **SIZES, intermediate_size=16, num_experts=experts, eos_token_id=1, pad_token_id=0
        )
        return tf.OlmoeForCausalLM(config).eval()
    config = tf.Qwen2MoeConfig(**SIZES, intermediate_size=16, moe_intermediate_size=16,
                               shared_expert_intermediate_size=16, num_experts=experts)  # fmt: skip
    return tf.Qwen2MoeForCausalLM(config).eval()


IDS = torch.arange(24).reshape(2, 12) * 7 % 96


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss", "olmoe", "qwen2_moe"])
def test_all_linear_adapts_the_experts_and_matches_peft_both_ways(kind, tmp_path):
    model = moe(kind)
    base = logits(model)
    torch.manual_seed(1)
    dt.inject(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    ours = logits(model)
    assert not torch.allclose(ours, base)
    dt.save_adapter(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] != "all-linear"  # written out, so PEFT selects exactly what trained
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    theirs = peft.PeftModel.from_pretrained(moe(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), ours, **TOL)

    torch.manual_seed(2)  # PEFT's own all-linear: experts and router ("gate.weight" / "router.weight")
    theirs = peft.get_peft_model(
        moe(kind), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    ).eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    model = moe(kind)
    dt.load_adapter(model, tmp_path / "theirs")
    torch.testing.assert_close(logits(model), expected, **TOL)
    dt.merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)
    dt.eject(model, merge=False)
    torch.testing.assert_close(logits(model), logits(moe(kind)), atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_the_preview_names_what_all_linear_adapts_on_an_moe_model():
    model = moe()
    preview = dt.preview_targets(model, dt.LoraConfig(r=2, target_modules="all-linear"))
    assert preview.parameters == {
        f"model.layers.{i}.mlp.experts": ("gate_up_proj", "down_proj") for i in (0, 1)
    }
    text = str(preview)
    assert "4 parameter(s) targeted (fused experts, target_parameters):" in text
    assert "model.layers.1.mlp.experts.down_proj" in text and "8 module(s) targeted" in text
    assert not any(name.rsplit(".", 1)[-1] == "gate" for name in preview.targets)  # the router is left alone
    named_too = dt.LoraConfig(r=2, target_modules="all-linear", target_parameters=["experts.down_proj"])
    nested = dt.preview_targets(model, named_too).parameters["model.layers.0.mlp.experts"]
    assert nested == ("gate_up_proj", "down_proj")  # the module's own order, which PEFT's keys follow


def test_every_expert_trains_and_the_loss_falls():
    model = moe().train()
    dt.inject(
        model,
        dt.LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 8  # A and B of two parameters in two layers: the base stays frozen
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            for layer in (model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts.base_layer):
                grad = layer.lora_B[
                    "default"
                ].weight.grad  # (out, r * E), expert e's columns at e, E + e, ...
                per_expert = grad.reshape(grad.shape[0], -1, layer.num_experts).abs().sum(dim=(0, 1))
                assert (per_expert > 0).all(), per_expert  # every expert's adapter receives gradient
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_a_second_adapter_shares_the_expert_wrappers_and_switches():
    model = moe()
    entries = ["experts.gate_up_proj", "experts.down_proj"]
    torch.manual_seed(1)
    dt.inject(model, dt.LoraConfig(r=2, target_parameters=entries, init_lora_weights=False), "a")
    first = logits(model)
    torch.manual_seed(2)
    dt.inject(model, dt.LoraConfig(r=2, target_parameters=entries, init_lora_weights=False), "b")
    second = logits(model)
    assert not torch.allclose(first, second)
    dt.set_adapter(model, "a")
    torch.testing.assert_close(logits(model), first)
    with pytest.raises(TargetingError, match=r"must adapt the same parameters, not \['down_proj'\]"):
        dt.inject(model, dt.LoraConfig(r=2, target_parameters=["experts.down_proj"]), "c")


def test_bad_parameter_targets_are_refused_by_name(tmp_path):
    with pytest.raises(
        TargetingError, match=r"'experts.gate_proj' matches no parameter .* nearest parameter names: \["
    ):
        dt.inject(moe(), dt.LoraConfig(r=2, target_parameters=["experts.gate_proj"]))
    with pytest.raises(
        TargetingError, match=r"selects 'model.layers.0.input_layernorm.weight' of shape \(32,\)"
    ):
        dt.inject(moe(), dt.LoraConfig(r=2, target_parameters=["input_layernorm.weight"]))
    with pytest.raises(TargetingError, match="selected by target_modules and owns parameters"):
        dt.inject(
            moe("mixtral"), dt.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["q_proj.weight"])
        )
    with pytest.raises(AdapterConfigError, match="lora_dropout=0.05 with target_parameters"):
        dt.LoraConfig(r=2, lora_dropout=0.05, target_parameters=["experts.down_proj"])
    with pytest.raises(
        AdapterConfigError, match="all-linear on Qwen3MoeForCausalLM also adapts its fused experts"
    ):
        dt.inject(moe(), dt.LoraConfig(r=2, lora_dropout=0.05, target_modules="all-linear"))

    model = moe(experts=4)
    dt.inject(model, dt.LoraConfig(r=2, target_parameters=["experts.down_proj"]))
    dt.save_adapter(model, tmp_path / "four")
    with pytest.raises(AdapterFormatError, match=r"down_proj was saved for 4 experts .* this model's has 8"):
        dt.load_adapter(moe(experts=8), tmp_path / "four", allow_base_mismatch=True)


def test_the_server_answers_with_an_expert_adapter_outside_mixed_batches(tmp_path, tiny_causal_lm):
    from fastapi.testclient import TestClient

    from deltatune.serve import build_server

    config = dt.LoraConfig(r=2, target_parameters=["experts.down_proj"], init_lora_weights=False)
    reason = capability_refusal(config, Capability.MIXED_BATCH)
    assert "adapts parameters by name" in reason and "copy of the expert weights" in reason
    assert capability_refusal(config, Capability.MERGE) is None

    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_causal_lm)
    torch.manual_seed(0)
    base = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        **{**SIZES, "vocab_size": len(tokenizer)}, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
        head_dim=8, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).eval()  # fmt: skip
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    dt.inject(base, config)
    dt.save_adapter(base, tmp_path / "adapters" / "experts")
    messages = [{"role": "user", "content": "good day"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = base.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    with dt.disable_adapter(base):
        plain = base.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(plain, out)  # the adapter changes the answer

    app, engine = build_server(str(tmp_path / "base"), tmp_path / "adapters", device="cpu")
    try:
        with TestClient(app) as client:
            body = {"model": "experts", "messages": messages, "max_tokens": 6, "temperature": 0}
            answer = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    finally:
        engine.close()
    assert answer == expected


def test_combining_expert_adapters_is_exact_per_expert(tmp_path):
    from deltatune.combine import combine_adapters, convert_adapter

    entries = ["q_proj", "experts.gate_up_proj", "experts.down_proj", "gate.weight"]  # the router as well
    for seed in (1, 2):
        model = moe()
        torch.manual_seed(seed)
        config = dt.LoraConfig(r=2, lora_alpha=4, target_modules=entries[:1], target_parameters=entries[1:],
                               init_lora_weights=False)  # fmt: skip
        dt.inject(model, config)
        dt.save_adapter(model, tmp_path / f"source{seed}")
    both = moe()
    dt.load_adapter(both, tmp_path / "source1", "one")
    dt.load_adapter(both, tmp_path / "source2", "two")
    dt.set_adapter(both, ["one", "two"])  # summed: the exact combination
    sources = [tmp_path / "source1", tmp_path / "source2"]
    report = combine_adapters(moe(), sources, tmp_path / "cat", method="cat", sample=IDS)
    combined = moe()
    dt.load_adapter(combined, tmp_path / "cat")
    torch.testing.assert_close(logits(combined), logits(both), atol=1e-5, rtol=1e-4)
    assert report.logits["max_abs_error"] < 1e-5 and report.rank == 4
    assert "model.layers.0.mlp.experts.down_proj#3" in report.ranks  # expert by expert

    report = combine_adapters(moe(), sources, tmp_path / "low", method="linear", rank=1, sample=IDS)
    truncated = moe()
    dt.load_adapter(truncated, tmp_path / "low")
    measured = float((logits(truncated) - logits(both)).abs().max())
    assert measured > 1e-3 and report.logits["max_abs_error"] == pytest.approx(measured, rel=1e-3)
    theirs = peft.PeftModel.from_pretrained(moe(), tmp_path / "low").eval()  # PEFT reads the result
    torch.testing.assert_close(logits(theirs), logits(truncated), **TOL)

    report = convert_adapter(moe(), tmp_path / "source1", tmp_path / "converted", rank=2, sample=IDS)
    assert report.max_relative_error < 1e-5
