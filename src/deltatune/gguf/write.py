"""Writing GGUF files with the `gguf` package (the library llama.cpp publishes): a merged llama model, and a
LoRA adapter in llama.cpp's adapter format. Both are written to a temporary name and renamed into place.

llama.cpp applies a GGUF LoRA as W + (alpha / rank) * B A with one `adapter.lora.alpha` per file and the rank
read from each tensor's shape, so every other scaling (rsLoRA, alpha_pattern, per-module ranks) is folded
into lora_B before writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.atomic import atomic_path
from ..core.errors import GgufExportError
from ..core.export import merged_model
from . import TENSOR_TYPES
from .layout import LlamaShape, gguf_module, gguf_name, interleave_rotary_rows, llama_shape, rotary_heads
from .vocab import add_vocabulary, pre_tokenizer_for

Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values


def _file_type(tensor_type: str) -> Any:
    gguf = gguf_module()
    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[tensor_type]


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor, tensor_type: str) -> str:
    """Write one tensor; vectors (norms) stay float32 as llama.cpp expects. Returns the type written."""
    gguf = gguf_module()
    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 1 or tensor_type == "f32":
        writer.add_tensor(name, array.astype(np.float32))
        return "f32"
    if tensor_type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return "q8_0"
    writer.add_tensor(name, array.astype(np.float16))
    return "f16"


def _add_hyperparameters(writer: Any, shape: LlamaShape, name: str, tensor_type: str) -> None:
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.blocks)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * shape.heads != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(_file_type(tensor_type))


def _write(writer: Any, path: Path) -> None:
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_model(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    *,
    tensor_type: str = "f16",
    pre_tokenizer: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Write `model` with its active adapters merged as one GGUF file llama.cpp loads. Matrices are stored as
    `tensor_type` (q8_0 falls back to f16 for a matrix whose rows are not a multiple of 32), norms as f32.
    Returns what was written: the pre-tokenizer and whether it is known, and the count of each tensor type."""
    gguf = gguf_module()
    if tensor_type not in TENSOR_TYPES:
        raise GgufExportError(f"tensor type {tensor_type!r}; choose one of {list(TENSOR_TYPES)}")
    shape = llama_shape(model)
    pre, known = pre_tokenizer_for(tokenizer, pre_tokenizer)
    state = merged_model(model).state_dict()
    path = Path(path)
    written: dict[str, int] = {}
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(None, "llama")
        _add_hyperparameters(
            writer, shape, name or getattr(model.config, "_name_or_path", "") or "model", tensor_type
        )
        add_vocabulary(writer, tokenizer, shape.vocab, pre)
        for key, tensor in state.items():
            if key == "lm_head.weight" and shape.tied:
                continue  # llama.cpp uses token_embd when there is no output tensor
            heads = rotary_heads(shape, key)
            if heads is not None:
                tensor = interleave_rotary_rows(tensor, heads)
            kind = _add_tensor(writer, gguf_name(shape, key), tensor, tensor_type)
            written[kind] = written.get(kind, 0) + 1
        _write(writer, tmp)
    return {"path": str(path), "tensor_type": tensor_type, "tensors": written,
            "pre_tokenizer": pre, "pre_tokenizer_known": known}  # fmt: skip


def write_gguf_lora(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    *,
    alpha: float,
    tensor_type: str = "f32",
) -> dict[str, Any]:
    """Write LoRA `factors` ({module name: (B, A)}, the full scaling folded into B, B @ A = ΔW in (out, in)
    layout) for the llama `model` as a llama.cpp adapter file with `adapter.lora.alpha` = alpha: each B is
    divided by alpha / rank, which llama.cpp multiplies back. Linear modules only."""
    gguf = gguf_module()
    if tensor_type not in ("f32", "f16"):
        raise GgufExportError(f"LoRA tensors are written as f32 or f16, not {tensor_type!r}")
    shape = llama_shape(model)
    modules = dict(model.named_modules())
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(None, "llama")
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for module_name, (b, a) in factors.items():
            module = modules.get(module_name)
            base = getattr(module, "base_layer", module)
            if not isinstance(base, nn.Linear):
                raise GgufExportError(
                    f"{module_name} is a {type(base).__name__}; llama.cpp adapters here cover linear layers only. "
                    "Leave it out of target_modules, or export the model merged"
                )
            heads = rotary_heads(shape, module_name)
            if heads is not None:
                b = interleave_rotary_rows(b, heads)
            target = gguf_name(shape, f"{module_name}.weight")
            b = b * (a.shape[0] / alpha)
            _add_tensor(writer, f"{target}.lora_a", a, tensor_type)
            _add_tensor(writer, f"{target}.lora_b", b, tensor_type)
        _write(writer, tmp)
    return {"path": str(path), "alpha": float(alpha), "modules": len(factors), "tensor_type": tensor_type}
