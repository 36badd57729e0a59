"""Interop with the pinned Hugging Face PEFT (pyproject: peft==0.21.2), both directions, same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CASES, VARIANTS, lora_config

import deltatune as dt

peft = pytest.importorskip("peft")
PEFT_CASES = [name for name, case in CASES.items() if case.peft_compatible]
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _logits(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs)


def _peft_config(case, variant):
    ours = lora_config(case, variant)
    return peft.LoraConfig(
        r=ours.r,
        lora_alpha=ours.lora_alpha,
        target_modules=ours.target_modules,
        modules_to_save=ours.modules_to_save,
        use_rslora=ours.use_rslora,
        use_dora=ours.use_dora,
        init_lora_weights=False,
    )


def _two_identical_bases(case):
    """One model to attach an adapter to and an untouched twin with the same weights to load it onto."""
    model, twin = case.build(), case.build()
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    return model, twin


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", PEFT_CASES)
def test_peft_loads_deltatune_adapter(name, variant, tmp_path):
    case = CASES[name]
    model, base = _two_identical_bases(case)
    dt.inject(model, lora_config(case, variant))
    ours = _logits(case, model.eval(), case.inputs())
    dt.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    torch.testing.assert_close(_logits(case, theirs, case.inputs()), ours, **TOL)
    assert not torch.allclose(ours, _logits(case, case.build(), case.inputs()))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", PEFT_CASES)
def test_deltatune_loads_peft_adapter(name, variant, tmp_path):
    case = CASES[name]
    model, base = _two_identical_bases(case)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(model, _peft_config(case, variant)).eval()
    expected = _logits(case, theirs, case.inputs())
    theirs.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "deltatune.json").exists()
    dt.load_adapter(base, tmp_path / "p")
    torch.testing.assert_close(_logits(case, base.eval(), case.inputs()), expected, **TOL)


def test_saved_config_uses_peft_field_names(tmp_path):
    case = CASES["llama"]
    model = case.build()
    dt.inject(model, lora_config(case, "dora"))
    dt.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_dora"] is True
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "a")
    assert (loaded.r, loaded.lora_alpha, loaded.use_dora) == (4, 8, True)


def test_peft_fails_on_static_same_padding_conv_but_deltatune_works(tmp_path):
    case = CASES["cnn"]
    inputs = case.inputs()
    with pytest.raises((TypeError, RuntimeError)):  # PEFT builds lora_A with the subclass's constructor
        theirs = peft.get_peft_model(case.build(), peft.LoraConfig(r=2, target_modules=["stem"]))
        _logits(case, theirs, inputs)
    model = case.build()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["stem"], init_lora_weights=False))
    adapted = _logits(case, model, inputs)
    dt.merge(model)
    torch.testing.assert_close(_logits(case, model, inputs), adapted, **TOL)


def _peft_ia3_config(case):
    from conftest import method_config

    ours = method_config(case, "ia3")
    return peft.IA3Config(
        target_modules=ours.target_modules, feedforward_modules=ours.feedforward_modules,
        modules_to_save=ours.modules_to_save, init_ia3_weights=True,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_ia3_interop_both_ways(name, tmp_path):
    from conftest import method_config

    case = CASES[name]
    # deltatune -> PEFT
    model, base = _two_identical_bases(case)
    torch.manual_seed(1)
    dt.inject(model, method_config(case, "ia3"))
    ours = _logits(case, model.eval(), case.inputs())
    dt.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "IA3"
        and config["feedforward_modules"] == method_config(case, "ia3").feedforward_modules
    )
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    torch.testing.assert_close(_logits(case, theirs, case.inputs()), ours, **TOL)
    # PEFT -> deltatune, with PEFT's vectors randomised so the check is not trivially the identity
    model, base = _two_identical_bases(case)
    theirs = peft.get_peft_model(model, _peft_ia3_config(case)).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for pname, param in theirs.named_parameters():
            if "ia3_l" in pname:
                param.copy_(0.5 + torch.rand_like(param))
    expected = _logits(case, theirs, case.inputs())
    assert not torch.allclose(expected, _logits(case, case.build(), case.inputs()))
    theirs.save_pretrained(tmp_path / "p")
    dt.load_adapter(base, tmp_path / "p")
    torch.testing.assert_close(_logits(case, base.eval(), case.inputs()), expected, **TOL)
