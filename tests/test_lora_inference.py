"""LoRA's lean inference path (LoraLinear._inference_forward): the output the general path gives, taken only
where it computes the same thing, and every change of the adapter seen. Of a trainable adapter nothing may be
kept between calls (a fused optimizer step writes the factors without bumping their version counters); a
frozen adapter in another dtype than its base keeps its casts while its factors are unchanged."""

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
        "dropout in train mode", "hook on the base layer", "two adapters", "DoRA", "bf16 autocast",
    ],
)  # fmt: skip
def test_the_general_path_serves_what_the_lean_one_would_change(case, lean_calls):
    dtype = torch.float32
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


def _general(layer, x):
    """The general low-rank path's output (what the layer computed before the lean path took this case)."""
    with torch.no_grad():
        return super(LoraLinear, layer)._lowrank_forward(x, ("default",))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_float32_adapter_on_a_half_base_keeps_its_casts_while_unchanged(half, lean_calls):
    """The lean path serves a frozen float32 adapter on a half base with the general path's exact output,
    casting A and B once; any write to them (a load's copy_, a new tensor, `.data =`) is cast again."""
    layer = _layer(half)
    layer.requires_grad_(False)  # as load_adapter leaves an adapter for inference
    x = torch.randn(3, 5, 16, dtype=half)
    with torch.no_grad():
        first = layer(x)
        kept = layer._cast_factors["default"].a
        second = layer(x)
    assert lean_calls == ["default", "default"]
    assert first.dtype == half and torch.equal(first, _general(layer, x)) and torch.equal(second, first)
    assert layer._cast_factors["default"].a is kept  # cast once, not per call

    a, b = layer.lora_A["default"], layer.lora_B["default"]
    changes = [
        lambda: a.weight.copy_(torch.randn_like(a.weight)),  # what loading an adapter's file does
        lambda: setattr(b, "weight", nn.Parameter(torch.randn_like(b.weight), requires_grad=False)),
        lambda: setattr(a.weight, "data", torch.randn_like(a.weight)),
    ]
    before = first
    for change in changes:
        with torch.no_grad():
            change()
            now = layer(x)
        assert torch.equal(now, _general(layer, x))
        assert (now.float() - before.float()).abs().max() > 1e-2  # the change moved the output, and was seen
        before = now


def test_a_trainable_float32_adapter_on_a_half_base_is_cast_per_call(lean_calls):
    """Trainable (training's evaluation under no_grad): no cast is kept, so fused AdamW's steps, which leave
    the version counters alone, are seen; an adapter frozen, evaluated, then trained is seen too."""
    layer = _layer(torch.bfloat16)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():
        before = layer(x)
    assert layer._cast_factors == {} and torch.equal(before, _general(layer, x))
    optimizer = torch.optim.AdamW(trainable, lr=0.1, fused=True)

    def step_and_compare(previous):
        layer(x).float().square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            now = layer(x)
        assert torch.equal(now, _general(layer, x))
        assert (now.float() - previous.float()).abs().max() > 1e-2
        return now

    before = step_and_compare(before)
    for p in trainable:  # frozen: its casts are kept ...
        p.requires_grad_(False)
    with torch.no_grad():
        before = layer(x)
    assert "default" in layer._cast_factors
    for p in trainable:  # ... and dropped by the next training forward, before fused AdamW writes the factors
        p.requires_grad_(True)
    after = step_and_compare(before)
    for p in trainable:  # frozen again: what it computes is the factors as trained, not the casts kept before
        p.requires_grad_(False)
    with torch.no_grad():
        now = layer(x)
    assert torch.equal(now, after) and torch.equal(now, _general(layer, x))
