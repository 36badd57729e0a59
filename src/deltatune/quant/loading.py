"""load_quantized: read a float safetensors checkpoint straight into a 4-bit / 8-bit model, one tensor at a time.

`from_pretrained` followed by `quantize_base` (or transformers' own BitsAndBytesConfig loading) memory-maps the
whole checkpoint and every page it reads stays resident until the map goes, so the peak is the full-precision
model however small the result. Here the model is built without weights (accelerate's `init_empty_weights`),
each tensor is read through its own short-lived safetensors handle, quantized or cast, and released: the peak is
the quantized model plus the largest single tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.allocator import release_freed_memory
from ..core.inject import set_child
from .bnb import (
    QuantizationError,
    _quantized_linear,
    check_request,
    quantization_targets,
    record_settings,
)

INDEX_NAME = "model.safetensors.index.json"


def checkpoint_tensors(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    from safetensors import safe_open

    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        found = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        raise QuantizationError(
            f"{folder} has no model.safetensors or {INDEX_NAME}"
            + (
                f" (only {found}: pickle checkpoints are not read; convert them to safetensors)"
                if found
                else ""
            )
        )
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _read(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:  # closed right away: its mapped pages leave our RSS
        return handle.get_tensor(key)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        raise KeyError(key)


def load_quantized(
    path: str | Path,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    model_class: Any = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A transformers model from the float checkpoint at `path`, its nn.Linear layers quantized as they load.

    The result equals `quantize_base(model_class.from_pretrained(path), bits, ...)` bit for bit. `dtype` is for
    the layers left in full precision (embeddings, norms, the output head); `model_class` defaults to
    AutoModelForCausalLM. Every weight must be in the checkpoint (tied ones excepted): a model whose head is
    newly initialised (a classifier on a base checkpoint) should go through from_pretrained and quantize_base.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    check_request(bits, quant_type)
    folder = Path(path)
    tensors = checkpoint_tensors(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise QuantizationError(f"{folder} is already a quantized checkpoint: load it with from_pretrained")
    # Parameters on the meta device; buffers (RoPE tables) computed for real, as from_pretrained would.
    with init_empty_weights(include_buffers=False):
        model = (model_class or AutoModelForCausalLM).from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.eval()
    targets, skipped = quantization_targets(model, skip_modules)
    weights_to_quantize = {f"{name}.weight": name for name in targets}
    for key, file in tensors.items():
        tensor = _read(file, key)
        name = weights_to_quantize.get(key)
        if name is not None:
            layer = _quantized_linear(
                model.get_submodule(name), tensor, bits, quant_type, double_quant, compute_dtype
            )
            set_child(model, name, layer)
            del tensor
            release_freed_memory()  # quantization temporaries; measured ~650 MiB held at 1.1B otherwise
            continue
        try:
            _assign(model, key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        except (KeyError, AttributeError):
            raise QuantizationError(
                f"checkpoint tensor {key!r} has no place in {type(model).__name__}; this checkpoint's names "
                "need transformers' own loading: use from_pretrained and then quantize_base"
            ) from None
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise QuantizationError(
            f"{folder} lacks {len(missing)} weights of {type(model).__name__} (first: {missing[:3]}); "
            "load it with from_pretrained (which initialises new weights) and then quantize_base"
        )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    record_settings(model, bits, quant_type, double_quant, compute_dtype, skipped)
    return model
