"""The fused LoRA linear kernel equals the plain autograd computation: outputs and all gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora.fused import FusedLoraLinear


def _pair(bias: bool, conv1d: bool, dropout: float = 0.0, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(12, 10)
    else:
        base = nn.Linear(10, 12, bias=bias)
    base = base.to(dtype=dtype, device=device)
    layers = []
    for _ in range(2):
        model = nn.Sequential(copy.deepcopy(base))
        dt.inject(
            model,
            dt.LoraConfig(
                r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False, lora_dropout=dropout
            ),
        )
        layers.append(model[0])
    layers[1].load_state_dict(layers[0].state_dict())
    return layers


@pytest.mark.parametrize("bias,conv1d", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_matches_plain_autograd(bias, conv1d, dropout, device):
    fused, plain = _pair(bias, conv1d, dropout, device=device)
    plain._fusable = lambda active, x: False  # force the unfused path on the reference copy
    assert fused._fusable(fused.active_adapters, torch.ones(1, 10, device=device))
    x = torch.randn(2, 5, 10, dtype=torch.float64, device=device)
    outs, grads = [], []
    for layer in (fused, plain):
        layer.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # same dropout mask
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in layer.adapter_parameters("default")])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-12)
    for g_fused, g_plain in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g_fused, g_plain, atol=1e-12, rtol=1e-12)


def test_fused_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: FusedLoraLinear.apply(x, None, w, bias, a, b, 1.5, False), (x, a, b)
    )


def test_torch_compile_traces_the_fused_layer_whole():
    """No graph break (Dynamo cannot trace a Function given one tensor twice, which is why no dropout passes
    x_d=None), and the compiled layer's output and gradients equal the eager ones."""
    fused, reference = _pair(bias=True, conv1d=False, dtype=torch.float32)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")  # fullgraph: a break is an error
    x = torch.randn(2, 5, 10)
    results = []
    for layer in (compiled, reference):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in (fused if layer is compiled else reference)
                                                 .adapter_parameters("default")])  # fmt: skip
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fused_under_bf16_autocast_matches_plain(device):
    fused, plain = _pair(True, False, dtype=torch.float32, device=device)
    plain._fusable = lambda active, x: False
    x = torch.randn(4, 10, device=device)
    results = []
    for layer in (fused, plain):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(x)
        y.float().pow(2).sum().backward()
        results.append((y, layer.lora_A["default"].weight.grad))
    assert results[0][0].dtype == results[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results[0][1], results[1][1], atol=5e-2, rtol=5e-2)
    assert results[0][1].dtype == torch.float32  # adapter weights stay float32


def test_hooks_on_base_layer_disable_fusion():
    fused, _ = _pair(True, False)
    seen = []
    fused.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not fused._fusable(fused.active_adapters, torch.ones(1, 10))
    fused(torch.randn(2, 10, dtype=torch.float64))
    assert seen == [torch.Size([2, 12])]
