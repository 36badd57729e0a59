"""LoRA's lean inference path (LoraLinear._inference_forward): the output the general path gives, taken only
where it computes the same thing, and every change of the adapter seen (nothing of it may be kept between
calls: a fused optimizer step writes the factors without bumping their version counters)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora.layers import LoraLinear


def _layer(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24).to(dtype))
    settings = dict(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False) | lora
    dt.inject(model, dt.LoraConfig(**settings))
    return model[0]


def _lean_and_general(layer, x):
    """(the no-grad output, the gradient path's output) of the same layer and input."""
    with torch.no_grad():
        lean = layer(x)
    return lean, layer(x).detach()


@pytest.fixture
def lean_calls(monkeypatch):
    calls = []
    real = LoraLinear._inference_forward

    def spy(self, x, name):
        calls.append(name)
        return real(self, x, name)

    monkeypatch.setattr(LoraLinear, "_inference_forward", spy)
    return calls


def test_the_lean_path_equals_the_general_one_and_follows_every_step(lean_calls):
    """A trainable B: fused AdamW writes it without bumping its version counter; evaluation between steps
    must still see each step (the training loop evaluates under no_grad)."""
    layer = _layer()
    x = torch.randn(3, 5, 16)
    lean, general = _lean_and_general(layer, x)
    assert lean_calls == ["default"]
    torch.testing.assert_close(lean, general, rtol=0, atol=1e-6)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=True)
    for _ in range(2):
        before = lean
        layer(x).square().sum().backward()
        optimizer.step()
        lean, general = _lean_and_general(layer, x)
        torch.testing.assert_close(lean, general, rtol=0, atol=1e-6)
        assert (lean - before).abs().max() > 1e-2  # the step moved the output, and the lean path saw it


@pytest.mark.parametrize(
    "case",
    [
        "dropout in train mode", "hook on the base layer", "two adapters", "DoRA", "half base, float32 adapter",
        "bf16 autocast",
    ],
)  # fmt: skip
def test_the_general_path_serves_what_the_lean_one_would_change(case, lean_calls):
    dtype = torch.bfloat16 if case.startswith("half") else torch.float32
    layer = _layer(dtype, **({"lora_dropout": 0.5} if case.startswith("dropout") else {}))
    if case == "DoRA":
        layer = _layer(use_dora=True)
    if case == "two adapters":
        layer.add_adapter("second", layer.adapter_configs["default"], "0")
        layer.set_active(["default", "second"])
    if case.startswith("hook"):
        layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    if case.startswith("dropout"):
        layer.train()
    x = torch.randn(3, 16, dtype=dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast"))
    with torch.no_grad(), autocast:
        general = layer(x)
    assert lean_calls == []
    if not case.startswith("dropout"):  # (random masks)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast")):
            torch.testing.assert_close(
                general, layer(x).detach(), rtol=1e-6, atol=1e-6
            )  # the gradient path's


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_graph_folds_the_update_in_the_adapters_precision(base_dtype, lean_calls, monkeypatch):
    """While a compile that freezes the weights traces the layer (runtime.compiled), W + s B A becomes one
    constant weight: summed in the adapter's dtype (float32 on a bf16 base) and rounded to the base's once."""
    from deltatune.methods.lora import layers

    layer = _layer(base_dtype)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=base_dtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    folded = (layer.base_layer.weight.float() + layer.scaling["default"] * b @ a).to(base_dtype)
    monkeypatch.setattr(layers, "_folding_constants", lambda: True)
    with torch.no_grad():
        out = layer(x)
    assert lean_calls == ["default"]
    torch.testing.assert_close(
        out, torch.nn.functional.linear(x, folded, layer.base_layer.bias), rtol=0, atol=0
    )
