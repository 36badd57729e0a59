"""Several named adapters on one model: switch, combine, disable, delete."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, lora_config

import deltatune as dt


def _out(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


@pytest.fixture
def two():
    case = CASES["llama"]
    inputs = case.inputs()
    singles = {}
    for name, seed, r in (("alpha", 1, 4), ("beta", 2, 8)):
        model = case.build()  # build() seeds itself; seed the adapter init after it
        torch.manual_seed(seed)
        dt.inject(model, lora_config(case, "lora", r=r), adapter_name=name)
        singles[name] = (model, _out(case, model, inputs))
    combined = case.build()
    for name, (_single, _) in singles.items():
        torch.manual_seed({"alpha": 1, "beta": 2}[name])
        dt.inject(combined, lora_config(case, "lora", r=4 if name == "alpha" else 8), adapter_name=name)
    return case, inputs, singles, combined


def test_switching_reproduces_each_single_adapter(two):
    case, inputs, singles, model = two
    assert dt.active_adapters(model) == ["beta"]
    for name in ("alpha", "beta", "alpha"):
        dt.set_adapter(model, name)
        torch.testing.assert_close(_out(case, model, inputs), singles[name][1], atol=1e-6, rtol=0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(name in n.split(".") for n in trainable)


def test_active_set_sums_updates_and_merges_consistently(two):
    case, inputs, singles, model = two
    base = _out(case, case.build(), inputs)
    dt.set_adapter(model, ["alpha", "beta"])
    both = _out(case, model, inputs)
    # The per-layer updates add; through a nonlinear network the outputs do not, so check merged == unmerged.
    assert not torch.allclose(both, singles["alpha"][1]) and not torch.allclose(both, base)
    dt.merge(model)
    torch.testing.assert_close(_out(case, model, inputs), both, atol=1e-5, rtol=1e-4)
    with pytest.raises(dt.MergeError, match="unmerge"):
        dt.set_adapter(model, "alpha")
    dt.unmerge(model)
    dt.set_adapter(model, "alpha")
    torch.testing.assert_close(_out(case, model, inputs), singles["alpha"][1], atol=1e-5, rtol=1e-4)


def test_delete_adapter(two, tmp_path):
    case, inputs, singles, model = two
    dt.delete_adapter(model, "beta")
    assert list(dt.adapter_configs(model)) == ["alpha"]
    assert not any("beta" in n for n, _ in model.named_parameters())
    dt.set_adapter(model, "alpha")
    torch.testing.assert_close(_out(case, model, inputs), singles["alpha"][1], atol=1e-6, rtol=0)
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'beta'"):
        dt.set_adapter(model, "beta")


def test_save_and_load_named_adapters(two, tmp_path):
    case, inputs, singles, model = two
    dt.save_adapter(model, tmp_path / "alpha", adapter_name="alpha")
    dt.save_adapter(model, tmp_path / "beta", adapter_name="beta")
    fresh = case.build()
    dt.load_adapter(fresh, tmp_path / "alpha", adapter_name="alpha")
    dt.load_adapter(fresh, tmp_path / "beta", adapter_name="beta")
    for name in ("alpha", "beta"):
        dt.set_adapter(fresh, name)
        torch.testing.assert_close(_out(case, fresh, inputs), singles[name][1], atol=1e-6, rtol=0)


def test_merge_by_name_when_adapters_target_different_modules():
    case = CASES["llama"]
    inputs = case.inputs()
    model = case.build()
    dt.inject(model, lora_config(case, "lora", target_modules=["q_proj"]), adapter_name="on_q")
    dt.inject(model, lora_config(case, "lora", target_modules=["v_proj"]), adapter_name="on_v")
    dt.set_adapter(model, "on_q")
    adapted = _out(case, model, inputs)
    assert dt.merge(model, adapter_names=["on_q"]) == ["on_q"]
    torch.testing.assert_close(_out(case, model, inputs), adapted, atol=1e-5, rtol=1e-4)
    with pytest.raises(dt.AdapterNameError, match="no adapter named 'nope'"):
        dt.merge(model, adapter_names=["nope"])


def test_save_one_adapter_when_another_targets_more_modules(tmp_path):
    """Regression: saving adapter "a" walked every wrapper and failed on layers only "b" wraps."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="a")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False), adapter_name="b")
    dt.save_adapter(model, tmp_path / "a", adapter_name="a")
    dt.save_adapter(model, tmp_path / "b", adapter_name="b")
    from safetensors.torch import load_file

    assert {k.split(".lora_")[0] for k in load_file(tmp_path / "a" / "adapter_model.safetensors")} == {
        "base_model.model.0"
    }
    assert len(load_file(tmp_path / "b" / "adapter_model.safetensors")) == 4
