"""Frozen-base quantization for QLoRA-style training: 4-bit NF4 (optionally double-quantized) or 8-bit
weights through bitsandbytes, with LoRA training in float on top.

bitsandbytes was chosen by measurement (one SmolLM2 MLP projection, forward + backward on this CPU): 1.14x the
float32 time, against 1.58x for torchao's NF4 tensor, at the same NF4 error.
"""

from ..core.errors import require_extra

require_extra("quant", ("bitsandbytes", "accelerate"), "a quantized base")  # before bnb's own imports fail

from .bnb import QuantizationError, QuantizationSettings, quantization_settings, quantize_base  # noqa: E402
from .linear4bit import make_exact  # noqa: E402
from .loading import load_quantized  # noqa: E402

__all__ = [
    "QuantizationError",
    "QuantizationSettings",
    "load_quantized",
    "make_exact",
    "quantization_settings",
    "quantize_base",
]
