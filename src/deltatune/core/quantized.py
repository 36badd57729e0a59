"""Frozen weights stored quantized (QLoRA): how core gets a float view of a weight it cannot do math on.

A quantization backend (deltatune.quant) registers, per module type, a function returning the dequantized
float32 weight laid out like `nn.Linear.weight` (optionally one writing it into a given buffer, which training
uses: see `scratch_weight`), and a reader that describes how a model was quantized. Core
never imports a backend library itself: a module from a known quantization package loads its deltatune
backend on first sight, so a model quantized by transformers (`from_pretrained(quantization_config=...)`)
is recognised without the user importing deltatune.quant.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_DEQUANTIZERS: dict[type[nn.Module], Callable[[nn.Module], torch.Tensor]] = {}
# Optional per type: write the float weight into a given tensor (its dtype), returning False when it cannot.
_INTO: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor], bool]] = {}
_SETTINGS_READERS: list[Callable[[nn.Module], Any]] = []
# Top-level package of a quantized layer type -> the deltatune module that registers it (imported lazily).
_BACKENDS = {"bitsandbytes": "deltatune.quant.bnb"}


def register_dequantizer(
    module_type: type[nn.Module],
    fn: Callable[[nn.Module], torch.Tensor],
    into: Callable[[nn.Module, torch.Tensor], bool] | None = None,
) -> None:
    _DEQUANTIZERS[module_type] = fn
    if into is not None:
        _INTO[module_type] = into


def register_settings_reader(fn: Callable[[nn.Module], Any]) -> None:
    """`fn(model)` returns an object with to_dict() describing the model's quantization, or None."""
    _SETTINGS_READERS.append(fn)


def _load_backend_for(module: nn.Module) -> None:
    backend = _BACKENDS.pop(type(module).__module__.partition(".")[0], None)
    if backend is not None:
        importlib.import_module(backend)


def _registered(table: dict[type[nn.Module], Any], module: nn.Module) -> Any:
    """The entry of `table` for the module's type (loading its backend first), or None."""
    _load_backend_for(module)
    return next((fn for module_type, fn in table.items() if isinstance(module, module_type)), None)


def _dequantizer(module: nn.Module) -> Callable[[nn.Module], torch.Tensor] | None:
    return _registered(_DEQUANTIZERS, module)


def is_quantized(module: nn.Module) -> bool:
    return _dequantizer(module) is not None


def float_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as float32 (dequantized if it is stored quantized), detached."""
    fn = _dequantizer(module)
    return (fn(module) if fn is not None else module.weight.detach()).float()


def logical_shape(module: nn.Module) -> list[int]:
    """The weight's shape as the float layer had it: quantized storage packs it (4-bit: (out*in/2, 1))."""
    if is_quantized(module):
        return [int(module.out_features), int(module.in_features)]
    return list(module.weight.shape)


def storage_dtype(module: nn.Module) -> str:
    """How the weight is stored: a torch dtype name, or the quantized layer type."""
    if is_quantized(module):
        return f"quantized:{type(module).__name__}"
    return str(module.weight.dtype).removeprefix("torch.")


_SCRATCH = threading.local()  # .buffers: (out, in, dtype) -> a CPU buffer, per thread


def scratch_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The module's dequantized weight in `dtype`, written into a buffer shared by every layer of the same
    shape on this thread: valid until the next call for that shape.

    A fresh float weight per call costs more than the dequantization itself on CPU: blocks that large are
    fresh pages from the OS (measured for a 5632 x 2048 NF4 weight: 20 ms fresh, 3.4 ms into a reused
    buffer). Backends without an `into` function, and non-CPU devices, get a fresh tensor."""
    into = _registered(_INTO, module)
    if into is not None and module.weight.device.type == "cpu":
        buffers = _SCRATCH.__dict__.setdefault("buffers", {})
        key = (int(module.out_features), int(module.in_features), dtype)
        buffer = buffers.get(key)
        if buffer is None:
            buffer = buffers[key] = torch.empty(key[:2], dtype=dtype)
        if into(module, buffer):
            return buffer
    return float_weight(module).to(dtype)


def release_scratch() -> None:
    """Drop this thread's dequantization buffers (about one float weight per distinct layer shape)."""
    _SCRATCH.__dict__.pop("buffers", None)


class _DequantizedLinear(torch.autograd.Function):
    """x W^T with W frozen and stored quantized: dequantized on the fly in forward and again in backward,
    into a reused buffer (`scratch_weight`), so no float weight outlives the op that needs it (also not
    under activation checkpointing, where a layer's forward runs twice)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return F.linear(x, scratch_weight(module, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ scratch_weight(ctx.module, grad.dtype), None


def quantized_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A frozen quantized linear layer's output. When gradients flow to `x` (training an adapter on top), it
    goes through _DequantizedLinear, in the layer's compute dtype; otherwise through the layer's own kernel."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return module(x)
    dtype = getattr(module, "compute_dtype", None) or x.dtype
    out = _DequantizedLinear.apply(x.to(dtype), module)
    bias = getattr(module, "bias", None)
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(x.dtype)


def dequantized_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear holding the quantized module's dequantized weight (and its bias), frozen."""
    bias = getattr(module, "bias", None)
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(float_weight(module).to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear


# Model attribute set by a backend: its settings object, with to_dict() (for provenance) and apply(model)
# (quantize another float model the same way: export_merged(requantize=True) uses it).
QUANTIZATION_ATTR = "_deltatune_quantization"


def quantization_of(model: nn.Module) -> Any:
    """The backend's settings object for a quantized model (deltatune- or transformers-quantized), or None."""
    settings = getattr(model, QUANTIZATION_ATTR, None)
    if settings is not None:
        return settings
    for module in model.modules():
        if is_quantized(module):  # loads the backend, which registers its reader
            break
    else:
        return None
    for reader in _SETTINGS_READERS:
        settings = reader(model)
        if settings is not None:
            return settings
    return None


def model_quantization(model: nn.Module) -> dict | None:
    """The settings the base was quantized with (for provenance), or None for a float base."""
    settings = quantization_of(model)
    return settings.to_dict() if settings is not None else None
