"""Export a merged, plain model folder that loads without deltatune.

The merged weights are computed out of place, so the live model (and its adapters) is left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import MergeError
from .inject import _check_untied, adapter_layers, all_wrappers, refuse_unmergeable
from .io import staged_folder
from .layer import AdapterLayer
from .state import plain_state_dict


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with the active adapters folded in."""
    layers = list(adapter_layers(model))
    refuse_unmergeable(
        [(name, layer, list(layer.unmerged_active)) for name, layer in layers],
        "be exported merged",
        "Save it with save_adapter and load it onto the base instead.",
    )
    _check_untied(model, [(name, layer) for name, layer in layers if layer.unmerged_active])
    state = plain_state_dict(model)
    for name, wrapper in all_wrappers(model):
        if isinstance(wrapper, AdapterLayer):
            if not wrapper.unmerged_active:
                continue
            weight = wrapper.base_weight
            bias = getattr(wrapper.base_layer, "bias", None)
            merged = weight.detach().float()
            merged_bias = bias.detach().float() if bias is not None else None
            for adapter in wrapper.unmerged_active:
                merged = wrapper.merged_weight(adapter, merged)
                if merged_bias is not None:  # methods that rescale outputs (IA3) fold into the bias too
                    new_bias = wrapper.merged_bias(adapter, merged_bias)
                    merged_bias = merged_bias if new_bias is None else new_bias
            state[f"{name}.weight"] = merged.to(weight.dtype)
            if bias is not None:
                state[f"{name}.bias"] = merged_bias.to(bias.dtype)
        else:
            for key, tensor in wrapper.current().state_dict().items():
                state[f"{name}.{key}"] = tensor
    return state


def export_merged(model: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Write the model with active adapters merged to `path`: a transformers folder (config + safetensors,
    and the tokenizer if given) for transformers models, else `model.safetensors` with the plain keys."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MergeError(f"{path} exists and is a file; export_merged writes a folder")
    state = merged_state_dict(model)
    with staged_folder(path) as staging:
        if hasattr(model, "save_pretrained") and hasattr(model, "config"):
            model.save_pretrained(staging, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        else:
            # safetensors refuses tensors sharing memory; store each once under its own key.
            seen: dict[int, str] = {}
            unique = {}
            for key, tensor in state.items():
                ptr = tensor.data_ptr()
                unique[key] = (
                    tensor.detach().clone().contiguous() if ptr in seen else tensor.detach().contiguous()
                )
                seen.setdefault(ptr, key)
            save_file(unique, staging / "model.safetensors", metadata={"format": "pt"})
    return path
