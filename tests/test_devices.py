"""`--device` and `--dtype`: what a command runs on and in, and what it says when the machine cannot."""

from __future__ import annotations

import warnings

import pytest
import torch

from deltatune.core.devices import inference_dtype, resolve_device
from deltatune.core.errors import DeltatuneWarning


def test_a_cpu_without_native_bfloat16_is_warned_and_still_served(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.warns(DeltatuneWarning, match="no native bfloat16.*AVX512-BF16 or AMX.*--dtype float32"):
        assert inference_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    # a packed base needs the half dtype: the advice is not to leave it, but when to drop --quantize
    with pytest.warns(DeltatuneWarning, match="no native bfloat16.*--quantize int8 still pays for one stream.*"
                      "many streams drop --quantize and use --dtype float32"):  # fmt: skip
        assert inference_dtype("bfloat16", torch.device("cpu"), quantize="int8") is torch.bfloat16


def test_native_bfloat16_float32_and_gpus_pass_quietly(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # AMX alone is enough
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert inference_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
        assert inference_dtype("float32", torch.device("cpu")) is torch.float32
        assert inference_dtype("float16", torch.device("cuda")) is torch.float16


def test_float16_on_a_cpu_without_amx_fp16_is_warned(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    with pytest.warns(DeltatuneWarning, match="no native float16.*AMX-FP16"):
        inference_dtype("float16", torch.device("cpu"))


def test_an_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="'int3' is not one of float32, bfloat16, float16"):
        inference_dtype("int3", torch.device("cpu"))


def test_auto_is_the_cpu_without_cuda_and_cuda_without_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
        resolve_device("cuda:0")


def test_a_bfloat16_server_answers_as_transformers_does_on_that_base(tiny_causal_lm, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.serve import build_server

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.bfloat16).eval()
    messages = [{"role": "user", "content": "Sentiment of: good day"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = base.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    app, engine = build_server(str(tiny_causal_lm), tmp_path, device="cpu", dtype="bfloat16")
    try:
        assert engine.model.get_input_embeddings().weight.dtype == torch.bfloat16
        with TestClient(app) as client:
            body = {"model": tiny_causal_lm.name, "messages": messages, "max_tokens": 8, "temperature": 0}
            reply = client.post("/v1/chat/completions", json=body).json()
    finally:
        engine.close()
    assert reply["choices"][0]["message"]["content"] == expected and expected


def test_an_int4_server_packs_its_base_and_answers_as_the_engine_on_it(tiny_causal_lm, tmp_path):
    """`serve --quantize int4`: the base packed (its output head in int8), and a chat completion is the
    engine's greedy answer on that packed base."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from deltatune.core.errors import DeltatuneWarning
    from deltatune.runtime import generate
    from deltatune.runtime.sampling import end_of_sequence_ids
    from deltatune.runtime.weight_only import Int4Linear, Int8Linear
    from deltatune.serve import build_server

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm)
    messages = [{"role": "user", "content": "Sentiment of: good day"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with warnings.catch_warnings():
        # every layer of this model packs (on a CPU without native bf16 the dtype's own warning still comes)
        warnings.filterwarnings("error", message="--quantize", category=DeltatuneWarning)
        app, engine = build_server(
            str(tiny_causal_lm), tmp_path, device="cpu", dtype="bfloat16", quantize="int4"
        )
    try:
        assert isinstance(engine.model.model.layers[0].mlp.gate_proj, Int4Linear)
        assert isinstance(engine.model.lm_head, Int8Linear)  # 385 outputs: int8 takes them, int4 could not
        eos = end_of_sequence_ids(engine.model, tokenizer)
        (done,) = generate(engine.model, [ids], [None], max_new_tokens=8, pad_token_id=0, eos_token_id=eos)
        with TestClient(app) as client:
            body = {"model": tiny_causal_lm.name, "messages": messages, "max_tokens": 8, "temperature": 0}
            reply = client.post("/v1/chat/completions", json=body).json()
    finally:
        engine.close()
    expected = tokenizer.decode(done.tokens, skip_special_tokens=True)
    assert reply["choices"][0]["message"]["content"] == expected and expected
