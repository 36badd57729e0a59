"""bitsandbytes 4-bit layers kept exact on CPU, whatever the CPU.

Two behaviours of bitsandbytes' CPU backend (seen in 0.48-0.50 on an AVX-512 CPU) make a 4-bit layer's output
depend on the machine, and break readers of the standard layout:
- its dequantization kernel assumes that no block of the flattened weight spans two rows, and returns wrong
  numbers where a row is not a whole number of blocks (a 32 x 48 weight in blocks of 64: errors as large as
  the weights themselves); the layer's own forward uses that kernel;
- on CPUs with AVX512-BF16, a Linear4bit repacks its weight in place on its first no-grad forward in eval
  mode, for a kernel of its own (blocks reordered, block scales rounded to bfloat16); dequantization, the
  fused LoRA path, merge and export then read garbage or fail.
deltatune decodes such weights in plain torch (the format's definition) and turns the repacking off. Layers
whose rows are whole blocks, as in every real model we ship, still take bitsandbytes' kernels.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.functional import (
    _convert_weight_packed_for_cpu_inverse,
    dequantize_blockwise,
    get_4bit_type,
)
from torch import nn


def kernel_is_exact(state: Any) -> bool:
    """Whether bitsandbytes' CPU kernel decodes a weight with this quant state correctly (whole blocks per row)."""
    return int(state.shape[-1]) % int(state.blocksize) == 0


def block_scales(state: Any) -> torch.Tensor:
    """Each block's absmax as float32, dequantized first under double quantization (8-bit absmax)."""
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def decode_4bit(
    layer: nn.Module, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's weight, dequantized in plain torch (into `out` when given): two 4-bit codes per byte (high
    nibble first) over the flattened weight, each looked up in the quant type's 16-value table and scaled by
    its block's absmax (itself 8-bit quantized under double quantization)."""
    state = layer.weight.quant_state
    packed = layer.weight.data.view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    table = get_4bit_type(state.quant_type, device=packed.device).float()
    count = torch.Size(state.shape).numel()
    scales = block_scales(state).repeat_interleave(int(state.blocksize))[:count]
    weight = (table[codes[:count]] * scales).reshape(tuple(state.shape))
    if out is None:
        return weight.to(dtype)
    return out.copy_(weight)


class ExactLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit, unchanged on disk and in state dicts; on CPU, a weight whose rows are not whole
    blocks is decoded in torch instead of by the kernel that gets it wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        if x.device.type != "cpu" or state is None or kernel_is_exact(state):
            return super().forward(x)
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), decode_4bit(self, dtype), bias).to(x.dtype)


def make_exact(model: nn.Module) -> nn.Module:
    """`keep_exact` on every bitsandbytes 4-bit layer of `model` (one loaded by transformers from a
    pre-quantized folder, say); returns the model."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            keep_exact(module)
    return model


def keep_exact(layer: nn.Module) -> None:
    """Make a bitsandbytes 4-bit layer exact on every CPU: no in-place repacking from now on (one that already
    happened is undone; its bfloat16 rounding of the block scales stays), and a plain Linear4bit becomes an
    ExactLinear4bit (same parameters, same state dict)."""
    if type(layer) is bnb.nn.Linear4bit:
        layer.__class__ = ExactLinear4bit
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            layer.weight.data, state
        )
