"""Fused LoRA linear for a frozen base: y = x W^T + b + s (x_d A^T) B^T in one autograd node.

Why: with plain autograd, each adapted layer adds several graph nodes and, in backward, a separate pass that
adds the adapter's input gradient to the base's. Here backward computes
    dx = g W + (s g B) A        (one GEMM, then one accumulating GEMM into the same buffer)
    dA = (s g B)^T x_d,  dB = s g^T h,  h = x_d A^T
and nothing for the frozen W and b. Shapes: x, x_d (..., in); W (out, in) (or (in, out) for Conv1D);
A (r, in); B (out, r). x_d is the dropped-out input, None when dropout is off (x then serves both; passing
the same tensor twice would stop torch.compile, which cannot trace a Function given one tensor twice).
A base stored quantized passes `weight_of(dtype)` instead of W: the float weight is then produced in forward
and again in backward (into a reused buffer, core.quantized.scratch_weight), never saved between them.
When dropout is off and x is a norm's output or a gated MLP's product, the kernel saves what x is rebuilt
from instead of x (core.rebuilt_inputs): tensors the frozen graph keeps anyway, so dA costs no saved input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...core.rebuilt_inputs import Recompute, rebuild_of


class FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, x_d, weight, bias, a, b, scaling: float, fan_in_fan_out: bool, weight_of=None, rebuild=None
    ):
        # (out, in) either way; a quantized base passes no weight but weight_of
        transposed = weight.t() if fan_in_fan_out and weight is not None else weight
        w = weight_of(x.dtype) if weight is None else transposed
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if x_d is None else x_d.reshape(-1, x_d.shape[-1])
        y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        h = xd2 @ a.t()
        y.addmm_(h, b.t(), alpha=scaling)
        sources, ctx.recompute = rebuild.adopt() if rebuild is not None else ((xd2,), None)
        ctx.save_for_backward(h, w if weight_of is None else None, a, b, *sources)
        ctx.scaling, ctx.same_input, ctx.weight_of = scaling, x_d is None, weight_of
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        h, w, a, b, *sources = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gh = (g2 @ b).mul_(ctx.scaling)  # (N, r)
        need_x, need_xd, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        dx = dxd = da = db = None
        if need_x:
            dx = g2 @ (w if ctx.weight_of is None else ctx.weight_of(g2.dtype))
            if ctx.same_input:
                dx.addmm_(gh, a)
            dx = dx.view(ctx.x_shape)
        if not ctx.same_input and need_xd:
            dxd = (gh @ a).view(ctx.x_shape)
        if need_a:
            xd2 = sources[0] if ctx.recompute is None else _rebuilt_input(ctx.recompute, sources, a.dtype)
            da = gh.t() @ xd2.reshape(-1, xd2.shape[-1])
        if need_b:
            db = (g2.t() @ h).mul_(ctx.scaling)
        return dx, dxd, None, None, da, db, None, None, None, None


def _rebuilt_input(recompute: Recompute, sources: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The layer's input x again, in the dtype the kernel computed in (autocast may have cast it)."""
    return recompute.value(tuple(sources)).to(dtype)


def fused_lora_linear(
    x,
    x_d,
    weight,
    bias,
    a,
    b,
    scaling: float,
    fan_in_fan_out: bool,
    weight_of: Callable[[torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply FusedLoraLinear, casting like autocast would (to the autocast dtype) when it is enabled.
    `x_d` is x itself when dropout is off."""
    x_d = None if x_d is x else x_d
    rebuild = rebuild_of(x) if x_d is None else None
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [t.to(dtype) if t is not None else None for t in (x, weight, bias, a, b)]
        x_cast = cast[0]
        x_d_cast = None if x_d is None else x_d.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return FusedLoraLinear.apply(
                x_cast, x_d_cast, *cast[1:], scaling, fan_in_fan_out, weight_of, rebuild
            )
    dtype = x.dtype
    a, b = a.to(dtype), b.to(dtype)
    return FusedLoraLinear.apply(x, x_d, weight, bias, a, b, scaling, fan_in_fan_out, weight_of, rebuild)
