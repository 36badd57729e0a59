"""Quantized frozen base (issue 6, first part): bitsandbytes NF4 / int8 layers under LoRA and DoRA.

The reference for "quantized LoRA matches float LoRA" is a float model whose weights are the *dequantized*
weights: the two must agree to float32 rounding (atol 1e-4 on logits of order 1), which isolates our code
from the quantization error itself. That error is reported separately with a documented bound.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import build_llama

import deltatune as dt

bnb = pytest.importorskip("bitsandbytes")
from deltatune.core.quantized import float_weight  # noqa: E402
from deltatune.quant import make_exact, quantization_settings, quantize_base  # noqa: E402
from deltatune.quant.bnb import QuantizationError  # noqa: E402

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
# Max |logit error| of the quantized base vs float, relative to max |logit|, on the tiny random llama.
QUANT_ERROR_BOUND = {4: 0.15, 8: 0.02}
# Quantized model vs a float model holding its dequantized weights: float32 rounding for 4 bits; in eval mode
# bitsandbytes runs the 8-bit matmul on float16-cast activations, which costs 1e-3-level rounding.
TWIN_TOLERANCE = {4: 1e-4, 8: 1e-2}


def _lora(**kwargs):
    return dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)


def _dequantized_twin(quantized) -> torch.nn.Module:
    """A float llama whose linear weights equal the quantized model's dequantized weights."""
    twin = build_llama()
    with torch.no_grad():
        for name, module in twin.named_modules():
            if type(module) is torch.nn.Linear:
                module.weight.copy_(float_weight(quantized.get_submodule(name)))
    return twin


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_base_replaces_linears_and_keeps_the_head(bits):
    model = build_llama()
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_base(model, bits)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].mlp.down_proj, kind)
    assert type(model.lm_head) is torch.nn.Linear  # the output head stays float
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert after < before
    settings = quantization_settings(model)
    assert settings.bits == bits and "lm_head" in settings.skipped
    base = build_llama()(input_ids=IDS).logits
    error = (model(input_ids=IDS).logits - base).abs().max() / base.abs().max()
    assert error < QUANT_ERROR_BOUND[bits], float(error)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_base_matches_lora_on_the_dequantized_weights(bits, dora):
    quantized = quantize_base(build_llama(), bits)
    twin = _dequantized_twin(quantized)
    torch.manual_seed(0)
    dt.inject(quantized, _lora(use_dora=dora))
    torch.manual_seed(0)
    dt.inject(twin, _lora(use_dora=dora))
    twin.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    tolerance = TWIN_TOLERANCE[bits]
    torch.testing.assert_close(
        quantized(input_ids=IDS).logits, twin(input_ids=IDS).logits, atol=tolerance, rtol=tolerance
    )
    quantized(input_ids=IDS).logits.pow(2).mean().backward()
    with_grad = {n for n, p in quantized.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)  # gradients reach only the adapter
    assert all(not p.requires_grad for n, p in quantized.named_parameters() if ".base_layer." in n)


def _train(model, steps: int = 40) -> list[float]:
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_training_on_a_4bit_base_lowers_the_loss_like_a_float_base(tiny_causal_lm):
    from transformers import AutoModelForCausalLM

    # The session's tiny llama (initializer_range 0.3: pretrained-like logit scale, so LoRA can learn).
    quantized = _train(quantize_base(AutoModelForCausalLM.from_pretrained(tiny_causal_lm), 4))
    floating = _train(AutoModelForCausalLM.from_pretrained(tiny_causal_lm))
    assert quantized[-1] < 0.8 * quantized[0], quantized
    assert quantized[-1] < 1.1 * floating[-1], (quantized[-1], floating[-1])


def test_save_load_round_trip_records_quantization_and_warns_on_another_base(tmp_path):
    model = quantize_base(build_llama(), 4)
    dt.inject(model, _lora())
    expected = model(input_ids=IDS).logits
    dt.save_adapter(model, tmp_path / "a")
    record = json.loads((tmp_path / "a" / "deltatune.json").read_text())
    assert record["quantization"]["bits"] == 4 and record["quantization"]["quant_type"] == "nf4"
    fresh = quantize_base(build_llama(), 4)
    dt.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(input_ids=IDS).logits, expected)
    for other in (build_llama(), quantize_base(build_llama(), 8)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dt.load_adapter(other, tmp_path / "a")
        assert any("outputs will differ slightly" in str(w.message) for w in caught)


def test_merge_in_place_is_refused_on_a_quantized_base():
    model = quantize_base(build_llama(), 4)
    dt.inject(model, _lora())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(dt.MergeError, match="stored quantized .*Linear4bit.*export_merged"):
        dt.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _quantized_with_lora(bits: int):
    model = quantize_base(build_llama(), bits)
    torch.manual_seed(1)
    dt.inject(model, _lora())
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_export_merged_dequantizes_merges_in_float_and_reports_the_error(tmp_path, bits):
    from transformers import LlamaForCausalLM

    model = _quantized_with_lora(bits)
    live = model(input_ids=IDS).logits
    before = copy.deepcopy(model.state_dict())
    report = dt.export_merged(model, tmp_path / "merged", sample=IDS)
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(type(m) is not bnb.nn.Linear4bit for m in plain.modules())
    assert plain.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert getattr(plain.config, "quantization_config", None) is None
    # Folding into the dequantized weights in float32 is exact up to rounding (TWIN_TOLERANCE) ...
    tolerance = TWIN_TOLERANCE[bits]
    torch.testing.assert_close(plain(input_ids=IDS).logits, live, atol=tolerance, rtol=tolerance)
    assert report.max_abs_error < tolerance and not report.requantized
    # ... and the report says so against the size of what the adapter does (LoRA B is random here).
    assert report.adapter_mean_abs_effect > {4: 1e3, 8: 100}[bits] * report.mean_abs_error
    assert report.quantization["bits"] == bits and report.sample == "given input_ids [2, 9]"
    on_disk = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert on_disk["max_abs_error"] == report.max_abs_error and on_disk["quantization"]["bits"] == bits
    # The live model is untouched: same weights, still quantized, same outputs.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(
        model.model.layers[0].mlp.down_proj.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    )
    assert torch.equal(model(input_ids=IDS).logits, live)


@pytest.mark.slow
def test_export_merged_requantized_reloads_as_4bit_with_the_reported_error(tmp_path):
    from transformers import LlamaForCausalLM

    model = _quantized_with_lora(4)
    live = model(input_ids=IDS).logits
    report = dt.export_merged(model, tmp_path / "merged", requantize=True, sample=IDS)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    make_exact(reloaded)  # this tiny model's rows are not whole blocks: see quant/linear4bit.py
    assert type(reloaded.lm_head) is torch.nn.Linear
    error = (reloaded(input_ids=IDS).logits - live).detach().abs()
    # Re-quantizing W + BA costs a real error, and the report measures exactly what reloading gives.
    assert report.requantized and report.max_abs_error > 1e-3
    assert float(error.max()) == pytest.approx(report.max_abs_error, rel=1e-5)
    assert report.error_to_effect == pytest.approx(report.mean_abs_error / report.adapter_mean_abs_effect)
    with pytest.raises(dt.MergeError, match="above max_error=1e-06; nothing was written"):
        dt.export_merged(model, tmp_path / "strict", requantize=True, sample=IDS, max_error=1e-6)
    assert not (tmp_path / "strict").exists()


def test_export_merged_of_a_prequantized_checkpoint_writes_a_float_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_prequantized_folder(tmp_path, 4))
    dt.inject(model, _lora())
    live = model(input_ids=IDS).logits
    report = dt.export_merged(model, tmp_path / "merged")  # default sample: random token ids
    assert report.sample == "random token ids [4, 32] (seed 0)" and report.max_abs_error < 1e-4
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(type(m) is not bnb.nn.Linear4bit for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=IDS).logits, live, atol=1e-4, rtol=1e-4)
    assert model.hf_quantizer is not None  # the live model still is the quantized one


def test_export_merged_of_a_quantized_plain_module_needs_a_sample(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    float_net = copy.deepcopy(net)
    quantize_base(net, 4, skip_modules=[])
    dt.inject(net, dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    with pytest.raises(dt.MergeError, match="pass sample="):
        dt.export_merged(net, tmp_path / "merged")
    with pytest.raises(dt.MergeError, match="not a transformers model"):
        dt.export_merged(net, tmp_path / "merged", requantize=True, sample={"input": torch.randn(3, 64)})
    x = torch.randn(3, 64)
    report = dt.export_merged(net, tmp_path / "merged", sample={"input": x})
    float_net.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(float_net(x), net(x), atol=1e-5, rtol=1e-5)
    assert report.max_abs_error < 1e-5


def test_requantize_on_a_float_base_is_refused(tmp_path):
    model = build_llama()
    dt.inject(model, _lora())
    with pytest.raises(dt.MergeError, match="requantize=True needs a quantized base"):
        dt.export_merged(model, tmp_path / "merged", requantize=True)
    assert not (tmp_path / "merged").exists()


def test_bad_requests_are_refused():
    with pytest.raises(QuantizationError, match="bits must be 4 or 8"):
        quantize_base(build_llama(), 3)
    model = build_llama()
    dt.inject(model, _lora())
    with pytest.raises(QuantizationError, match="quantize the base first, then inject"):
        quantize_base(model, 4)
    model = quantize_base(build_llama(), 4)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_base(model, 4)


@pytest.mark.slow
def test_deltatune_train_with_a_quantization_section(tiny_causal_lm, tmp_path):
    from train_helpers import causal_config, instruction_rows, write_jsonl

    from deltatune.train import ConfigError, evaluate_adapter, train, validate_config

    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(200, 0))
    raw = causal_config(tiny_causal_lm, data, tmp_path / "run", max_steps=30)
    raw["quantization"] = {"bits": 4}
    cfg = validate_config(raw)
    before = evaluate_adapter(cfg, None)["loss"]
    result = train(cfg)
    assert result.validation["loss"] < 0.8 * before, (before, result.validation["loss"])
    record = json.loads((tmp_path / "run" / "adapter" / "deltatune.json").read_text())
    assert record["quantization"]["bits"] == 4
    reloaded = evaluate_adapter(cfg, tmp_path / "run" / "adapter")[
        "loss"
    ]  # same quantized base, same numbers
    assert reloaded == pytest.approx(result.validation["loss"], rel=1e-5)
    raw["adapter"] = {"method": "full"}
    with pytest.raises(ConfigError, match="quantization needs a frozen base"):
        validate_config(raw)


def _bnb_config(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)


def _prequantized_folder(tmp_path, bits: int):
    """A transformers folder holding bitsandbytes-packed weights, as `save_pretrained` of a 4/8-bit model writes."""
    from transformers import AutoModelForCausalLM

    build_llama().save_pretrained(tmp_path / "float")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=_bnb_config(bits))
    loaded.save_pretrained(tmp_path / f"prequantized-{bits}")
    return tmp_path / f"prequantized-{bits}"


@pytest.mark.parametrize("bits", [4, 8])
def test_a_prequantized_transformers_checkpoint_takes_lora(tmp_path, bits):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_prequantized_folder(tmp_path, bits))
    settings = quantization_settings(model)
    assert settings.bits == bits and settings.skipped == ("lm_head",)
    assert settings.library == "bitsandbytes (loaded by transformers)"
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_base(model, 4)
    twin = _dequantized_twin(model)
    torch.manual_seed(0)
    dt.inject(model, _lora())
    torch.manual_seed(0)
    dt.inject(twin, _lora())
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    tolerance = TWIN_TOLERANCE[bits]
    torch.testing.assert_close(
        model(input_ids=IDS).logits, twin(input_ids=IDS).logits, atol=tolerance, rtol=tolerance
    )
    dt.save_adapter(model, tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "deltatune.json").read_text())
    assert record["quantization"]["bits"] == bits
    assert record["quantization"]["library"] == "bitsandbytes (loaded by transformers)"


@pytest.mark.slow
def test_a_prequantized_checkpoint_is_recognised_without_importing_deltatune_quant(tmp_path):
    """LoRA must not treat a packed bitsandbytes weight as a float one just because nobody imported our backend."""
    import subprocess
    import sys

    folder = _prequantized_folder(tmp_path, 4)
    script = (
        "import sys, deltatune as dt\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'deltatune.quant' not in sys.modules\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        "dt.inject(model, dt.LoraConfig(r=2, target_modules=['q_proj']))\n"
        "layer = model.model.layers[0].self_attn.q_proj\n"
        "assert layer.quantized and not layer.weight_path, 'packed weight taken for a float one'\n"
        "assert dt.core.quantized.model_quantization(model)['bits'] == 4\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.slow
def test_deltatune_train_on_a_prequantized_checkpoint(tiny_causal_lm, tmp_path):
    from train_helpers import causal_config, instruction_rows, write_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.train import ConfigError, evaluate_adapter, train, validate_config

    folder = tmp_path / "prequantized"
    AutoModelForCausalLM.from_pretrained(tiny_causal_lm, quantization_config=_bnb_config(4)).save_pretrained(
        folder
    )
    AutoTokenizer.from_pretrained(tiny_causal_lm).save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", instruction_rows(200, 0))
    raw = causal_config(str(folder), data, tmp_path / "run", max_steps=30)
    cfg = validate_config(raw)
    before = evaluate_adapter(cfg, None)["loss"]
    result = train(cfg)
    assert result.validation["loss"] < 0.8 * before, (before, result.validation["loss"])
    record = json.loads((tmp_path / "run" / "adapter" / "deltatune.json").read_text())
    assert record["quantization"]["bits"] == 4 and "transformers" in record["quantization"]["library"]
    raw["quantization"], raw["output_dir"] = {"bits": 8}, str(tmp_path / "run2")
    with pytest.raises(ConfigError, match="pre-quantized checkpoint .*remove the quantization section"):
        train(validate_config(raw))


@pytest.mark.parametrize("bits", [4, 8])
def test_load_quantized_streams_to_the_same_model_as_quantize_base(tmp_path, bits):
    from transformers import AutoModelForCausalLM

    from deltatune.quant import load_quantized

    build_llama().save_pretrained(tmp_path / "float", max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "float" / "model.safetensors.index.json").is_file()
    streamed = load_quantized(tmp_path / "float", bits)
    reference = quantize_base(AutoModelForCausalLM.from_pretrained(tmp_path / "float").eval(), bits)
    assert quantization_settings(streamed) == quantization_settings(reference)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # packed bytes and quantization state alike
    assert torch.equal(streamed(input_ids=IDS).logits, reference(input_ids=IDS).logits)
    assert not any(m.training for m in streamed.modules())


def test_load_quantized_refuses_what_it_cannot_read(tmp_path):
    from deltatune.quant import QuantizationError, load_quantized

    model = build_llama()
    model.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(QuantizationError, match="pickle checkpoints are not read"):
        load_quantized(tmp_path / "pickled")
    with pytest.raises(QuantizationError, match="already a quantized checkpoint"):
        load_quantized(_prequantized_folder(tmp_path, 4))
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path / "partial")
    # copied out of the file it overwrites (safetensors 0.4 hands out memory-mapped tensors: a bus error)
    state = {k: v.clone() for k, v in load_file(tmp_path / "partial" / "model.safetensors").items()}
    save_file(
        {k: v for k, v in state.items() if "layers.1.mlp" not in k},
        tmp_path / "partial" / "model.safetensors",
    )
    with pytest.raises(QuantizationError, match="lacks 3 weights"):
        load_quantized(tmp_path / "partial")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapter_gradients_on_a_4bit_base_match_the_float_twin_and_dequantize_into_shared_buffers(
    checkpointing, monkeypatch
):
    from deltatune.core import quantized as registry
    from deltatune.train.setup import enable_gradient_checkpointing

    quantized = quantize_base(build_llama(), 4)
    twin = _dequantized_twin(quantized)
    for model in (quantized, twin):
        torch.manual_seed(0)
        dt.inject(model, _lora())
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
    twin.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    calls: dict[int, list[int]] = {}  # module -> the buffer pointer of each dequantization
    into = registry._INTO[bnb.nn.Linear4bit]

    def counting(module, out):
        calls.setdefault(id(module), []).append(out.data_ptr())
        return into(module, out)

    fresh = []
    dequantize = registry._DEQUANTIZERS[bnb.nn.Linear4bit]
    monkeypatch.setitem(registry._INTO, bnb.nn.Linear4bit, counting)
    monkeypatch.setitem(registry._DEQUANTIZERS, bnb.nn.Linear4bit, lambda m: fresh.append(m) or dequantize(m))
    for model in (quantized, twin):
        model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.grad is not None}
    expected = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-4, rtol=1e-3)
    # Layer 1 sees inputs that need gradients: forward + backward, and with checkpointing the recompute too;
    # every one writes into the buffer that all layers of that shape share, none allocates a float weight.
    layer = quantized.model.layers[1].mlp.down_proj
    assert layer._fusable(
        ("default",), torch.ones(1, layer.in_features)
    )  # one autograd node: the fused kernel
    down = [id(quantized.model.layers[i].mlp.down_proj.base_layer) for i in (0, 1)]
    assert len(calls[down[1]]) == (3 if checkpointing else 2)
    assert len(set(calls[down[0]] + calls[down[1]])) == 1 and not fresh


@pytest.mark.parametrize("quant", ["nf4", "nf4-double", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scratch_dequantization_equals_the_library_result(quant, dtype):
    from deltatune.core.quantized import scratch_weight

    model = build_llama()
    if quant == "int8":
        quantize_base(model, 8)
    else:
        quantize_base(model, 4, quant_type=quant[:3], double_quant=quant.endswith("double"))
    for name in (
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
    ):
        layer = model.get_submodule(name)
        torch.testing.assert_close(
            scratch_weight(layer, dtype), float_weight(layer).to(dtype), atol=0, rtol=0
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_trainable_summary_counts_the_logical_weights_of_a_quantized_base(bits):
    reference = build_llama()
    dt.inject(reference, _lora())
    model = quantize_base(build_llama(), bits)
    dt.inject(model, _lora())
    summary, expected = dt.trainable_summary(model), dt.trainable_summary(reference)
    assert summary.total == expected.total and summary.trainable == expected.trainable


@pytest.mark.parametrize("shape", [(32, 48), (64, 128)])
def test_4bit_layers_decode_and_run_exactly_whatever_the_cpu(shape):
    """bitsandbytes' vectorized CPU kernel gets rows that are not whole blocks wrong (32 x 48 in blocks of 64),
    and repacks weights on AVX512-BF16 CPUs at the first no-grad forward; neither may show through."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    model = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=True))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    quantize_base(model, 4, double_quant=False)
    layer = model[0].eval()
    decoded = float_weight(layer)
    # Each weight is its block's absmax times the nearest NF4 level: off by at most half the widest gap.
    table = bnb.functional.get_4bit_type("nf4", device="cpu").float()
    absmax = weight.reshape(-1, 64).abs().amax(1, keepdim=True)
    error = (decoded - weight).reshape(-1, 64).abs() / absmax
    assert float(error.max()) <= float(table.diff().max()) / 2 + 1e-6
    if shape[1] % 64 == 0:  # whole blocks per row: bitsandbytes' own kernel agrees exactly
        state = layer.weight.quant_state
        assert torch.equal(decoded, bnb.functional.dequantize_4bit(layer.weight.data, state).float())
    x = torch.randn(3, shape[1])
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, decoded, layer.bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(float_weight(layer), decoded)  # no repacking behind our back


def test_keep_exact_undoes_a_cpu_repacking_and_turns_it_off():
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from deltatune.quant.linear4bit import ExactLinear4bit, keep_exact

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4").to("cpu")
    before = float_weight(layer)  # makes it exact too; undo that to repack it as bitsandbytes would
    layer.__class__, layer.support_avx512bf16_for_cpu = bnb.nn.Linear4bit, True
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    keep_exact(layer)
    assert type(layer) is ExactLinear4bit and layer.support_avx512bf16_for_cpu is False
    # back in the standard layout; only the block scales keep their bfloat16 rounding
    torch.testing.assert_close(float_weight(layer), before, rtol=1e-2, atol=0)
