"""What a config says about the base model: where it is, its task and dtype, and how to quantize it."""

from __future__ import annotations

from typing import Literal

from ..core.section import Section


class ModelSpec(Section):
    # A local folder, a hub id (loaded with from_pretrained), or a bundled name: "smollm2" | "minilm".
    path: str
    task: Literal["causal_lm", "classification"] = "causal_lm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class QuantSpec(Section):
    # Store the frozen base's linear layers in 4-bit NF4 / FP4 or 8-bit (QLoRA; bitsandbytes, the `quant` extra).
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    skip_modules: list[str] | None = None  # default: the output head and classification heads
