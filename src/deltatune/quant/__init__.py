"""Frozen-base quantization for QLoRA-style training: 4-bit NF4 (optionally double-quantized) or 8-bit
weights through bitsandbytes, with LoRA training in float on top.

bitsandbytes was chosen by measurement (one SmolLM2 MLP projection, forward + backward on this CPU): 1.14x the
float32 time, against 1.58x for torchao's NF4 tensor, at the same NF4 error.
"""

from .bnb import QuantizationError, QuantizationSettings, quantization_settings, quantize_base
from .linear4bit import make_exact
from .loading import load_quantized

__all__ = [
    "QuantizationError",
    "QuantizationSettings",
    "load_quantized",
    "make_exact",
    "quantization_settings",
    "quantize_base",
]
