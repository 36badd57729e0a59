"""GGUF export for llama.cpp: a merged llama model (f32, f16, q8_0) and a LoRA adapter file, written with the
`gguf` package. `make gguf-check` loads both in llama.cpp (llama-cpp-python) and compares with transformers.

Names are imported on first use, so the CLI can read TENSOR_TYPES without loading torch.
"""

from __future__ import annotations

from typing import Any

TENSOR_TYPES = ("f32", "f16", "q8_0")
_WHERE = {"export_gguf_lora": "lora", "write_gguf_lora": "write", "write_gguf_model": "write"}
__all__ = ["TENSOR_TYPES", "export_gguf_lora", "write_gguf_lora", "write_gguf_model"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
