"""Bad input: each case gets a specific error type and a message that names the problem and the fix."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import CASES, build_llama, lora_config
from safetensors.torch import load_file, save_file

import deltatune as dt


@pytest.fixture
def saved(tmp_path):
    case = CASES["llama"]
    model = case.build()
    pristine = copy.deepcopy(model.state_dict())
    dt.inject(model, lora_config(case, "lora"))
    folder = dt.save_adapter(model, tmp_path / "adapter")
    return case, model, pristine, folder


def _fresh(case, pristine):
    model = case.build()
    model.load_state_dict(pristine)
    return model


def _drop_provenance(folder):
    os.remove(folder / "deltatune.json")  # as if PEFT had written it: no fingerprint/sha check


def test_different_base_weights_are_refused_then_overridable(saved):
    case, _, _, folder = saved
    torch.manual_seed(123)
    other = case.build()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    with pytest.raises(
        dt.BaseModelMismatchError, match="targeted base weights differ.*allow_base_mismatch=True"
    ):
        dt.load_adapter(other, folder)
    assert not dt.adapter_configs(other)  # nothing left behind by the failed load
    with pytest.warns(UserWarning, match="different base model"):
        dt.load_adapter(other, folder, allow_base_mismatch=True)


def test_failed_load_keeps_the_previously_active_adapters(saved):
    case, _, pristine, folder = saved
    other = _fresh(case, pristine)
    dt.inject(other, lora_config(case, "lora"), adapter_name="first")
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.base_layer.weight.add_(0.01)
    other.model.layers[0].self_attn.k_proj._base_digest = None  # as if this had been the pristine weight
    with pytest.raises(dt.BaseModelMismatchError):
        dt.load_adapter(other, folder, adapter_name="second")
    assert dt.active_adapters(other) == ["first"] and list(dt.adapter_configs(other)) == ["first"]


def test_different_shapes_are_named(saved):
    _, _, _, folder = saved
    wider = build_llama(hidden=64)
    with pytest.raises(
        dt.BaseModelMismatchError,
        match=r"embed_tokens.weight shape \[96, 32\] \(adapter\) vs \[96, 64\] \(model\).*\(\+10 more\)",
    ):
        dt.load_adapter(wider, folder)


def test_dtype_difference_warns_and_loads(saved):
    case, model, pristine, folder = saved
    half = _fresh(case, pristine).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16 here but were float32"):
        dt.load_adapter(half, folder)


def test_rank_mismatch_names_r(saved):
    case, _, pristine, folder = saved
    _drop_provenance(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        dt.AdapterFormatError,
        match=r"rank 8 \(r / rank_pattern\), but its saved weights have rank 4",
    ):
        dt.load_adapter(_fresh(case, pristine), folder)


def test_missing_and_unexpected_keys(saved):
    case, _, pristine, folder = saved
    _drop_provenance(folder)
    # copied out of the file: it is rewritten below, and safetensors 0.4 hands out memory-mapped tensors: a bus error
    state = {k: v.clone() for k, v in load_file(folder / "adapter_model.safetensors").items()}
    first = sorted(k for k in state if "q_proj" in k)
    state_missing = {k: v for k, v in state.items() if not k.startswith(first[0].rsplit(".lora_", 1)[0])}
    save_file(state_missing, folder / "adapter_model.safetensors")
    with pytest.raises(dt.AdapterFormatError, match="module\\(s\\) without weights"):
        dt.load_adapter(_fresh(case, pristine), folder)
    state["base_model.model.model.norm.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(dt.AdapterFormatError, match="1 unexpected key"):
        dt.load_adapter(_fresh(case, pristine), folder)


def test_truncated_safetensors(saved):
    case, _, pristine, folder = saved
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(dt.AdapterFormatError, match="truncated or corrupted"):
        dt.load_adapter(_fresh(case, pristine), folder)


def test_flipped_bytes_caught_by_recorded_hash(saved):
    case, _, pristine, folder = saved
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # still parses as safetensors; only the recorded sha256 can tell
    (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(dt.AdapterFormatError, match="contents changed since saving"):
        dt.load_adapter(_fresh(case, pristine), folder)


def test_unknown_config_key_warns_and_is_ignored(saved):
    case, model, pristine, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["shiny_new_option"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(config))
    fresh = _fresh(case, pristine)
    with pytest.warns(UserWarning, match="ignoring unknown key\\(s\\) \\['shiny_new_option'\\]"):
        dt.load_adapter(fresh, folder)
    inputs = case.inputs()
    with torch.no_grad():
        assert torch.equal(case.run(fresh, inputs), case.run(model, inputs))


@pytest.mark.parametrize("key", ["r", "lora_alpha", "target_modules", "peft_type"])
def test_missing_required_config_key(saved, key):
    case, _, pristine, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    del config[key]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(dt.AdapterConfigError, match=f"required key.*{key}"):
        dt.load_adapter(_fresh(case, pristine), folder)


def test_unsupported_peft_feature_is_an_error_not_silence(saved):
    case, _, pristine, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(lora_bias=True, use_qalora=False, megatron_core="megatron.core")  # only lora_bias matters
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(dt.AdapterConfigError, match="lora_bias=True"):
        dt.load_adapter(_fresh(case, pristine), folder)


def test_broken_json_config(saved):
    case, _, pristine, folder = saved
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(dt.AdapterConfigError, match="not valid JSON"):
        dt.load_adapter(_fresh(case, pristine), folder)


def test_pickled_bin_refused_unless_opted_in(saved):
    case, model, pristine, folder = saved
    _drop_provenance(folder)
    state = load_file(folder / "adapter_model.safetensors")
    os.remove(folder / "adapter_model.safetensors")
    torch.save(state, folder / "adapter_model.bin")
    with pytest.raises(dt.UnsafeFormatError, match="pickle.*allow_pickle=True"):
        dt.load_adapter(_fresh(case, pristine), folder)
    fresh = _fresh(case, pristine)
    dt.load_adapter(fresh, folder, allow_pickle=True)
    inputs = case.inputs()
    with torch.no_grad():
        assert torch.equal(case.run(fresh, inputs), case.run(model, inputs))


def test_file_where_folder_expected(saved, tmp_path):
    case, model, pristine, folder = saved
    with pytest.raises(dt.AdapterFormatError, match="is a file; load_adapter expects the folder"):
        dt.load_adapter(_fresh(case, pristine), folder / "adapter_config.json")
    (tmp_path / "plain_file").write_text("x")
    with pytest.raises(dt.AdapterFormatError, match="exists and is a file"):
        dt.save_adapter(model, tmp_path / "plain_file")
    with pytest.raises(dt.AdapterNotFoundError, match="does not exist"):
        dt.load_adapter(_fresh(case, pristine), tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["weight", "q_proj", "lora_A", "base_layer", "layers", "bad.name", ""])
def test_adapter_name_collisions(name):
    case = CASES["llama"]
    with pytest.raises(dt.AdapterNameError, match="adapter name"):
        dt.inject(case.build(), lora_config(case, "lora"), adapter_name=name)


def test_duplicate_adapter_name():
    case = CASES["llama"]
    model = case.build()
    dt.inject(model, lora_config(case, "lora"))
    with pytest.raises(dt.AdapterNameError, match="already exists"):
        dt.inject(model, lora_config(case, "lora"))


def test_failed_save_leaves_nothing_half_written(saved, monkeypatch):
    case, model, _, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dt.core.io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        dt.save_adapter(model, folder)  # overwrite attempt
    with pytest.raises(OSError, match="disk full"):
        dt.save_adapter(model, folder.parent / "new_one")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        "adapter"
    ]  # no temp folders, no partial new one


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    case = CASES["llama"]
    model = case.build()
    dt.inject(model, lora_config(case, "lora"))
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.MergeError, match="non-finite"):
        dt.merge(model, safe_merge=True)
    assert all(torch.equal(v, before[k]) or v.isnan().any() for k, v in model.state_dict().items())
    assert all(not layer.merged_adapters for _, layer in dt.core.adapters.adapter_layers(model))


def test_merge_into_tied_weights_is_refused():
    case = CASES["gpt2"]
    model = case.build()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["wte"]))
    with pytest.raises(dt.MergeError, match="tied to \\['lm_head.weight'\\]"):
        dt.merge(model)


def test_disable_while_merged_is_refused():
    case = CASES["llama"]
    model = case.build()
    dt.inject(model, lora_config(case, "lora"))
    dt.merge(model)
    with pytest.raises(dt.MergeError, match="unmerge"), dt.disable_adapter(model):
        pass


def test_unsupported_lora_options_are_named():
    with pytest.raises(dt.AdapterConfigError, match="bias='all' is not supported"):
        dt.LoraConfig(bias="all")
    with pytest.raises(dt.AdapterConfigError, match="init_lora_weights='pissa'"):
        dt.LoraConfig(init_lora_weights="pissa")
    with pytest.raises(dt.AdapterConfigError, match="r must be a positive integer"):
        dt.LoraConfig(r=0)


def test_different_tokenizer_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from deltatune.models import minilm_path

    case = CASES["llama"]
    model = case.build()
    pristine = copy.deepcopy(model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    dt.inject(model, lora_config(case, "lora"))
    folder = dt.save_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    dt.load_adapter(_fresh(case, pristine), folder, tokenizer=tokenizer)  # same tokenizer: fine
    tokenizer.add_tokens(["<new_token>"])
    with pytest.raises(dt.BaseModelMismatchError, match="tokenizer differs"):
        dt.load_adapter(_fresh(case, pristine), folder, tokenizer=tokenizer)


def test_saved_folder_is_readable_by_others(saved):
    *_, folder = saved
    assert folder.stat().st_mode & 0o755 == 0o755
