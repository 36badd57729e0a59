"""Frozen weights stored quantized (QLoRA): how core gets a float view of a weight it cannot do math on.

A quantization backend (deltatune.quant) registers, per module type, a function returning the dequantized
float32 weight laid out like `nn.Linear.weight`. Core never imports a backend; unregistered modules are plain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_DEQUANTIZERS: dict[type[nn.Module], Callable[[nn.Module], torch.Tensor]] = {}


def register_dequantizer(module_type: type[nn.Module], fn: Callable[[nn.Module], torch.Tensor]) -> None:
    _DEQUANTIZERS[module_type] = fn


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(module, t) for t in _DEQUANTIZERS)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as float32 (dequantized if it is stored quantized), detached."""
    for module_type, fn in _DEQUANTIZERS.items():
        if isinstance(module, module_type):
            return fn(module).float()
    return module.weight.detach().float()


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


QUANTIZATION_ATTR = "_deltatune_quantization"  # model attribute set by the backend: an object with to_dict()


def model_quantization(model: nn.Module) -> dict | None:
    """The settings the base was quantized with (for provenance), or None for a float base."""
    settings = getattr(model, QUANTIZATION_ATTR, None)
    return settings.to_dict() if settings is not None else None
