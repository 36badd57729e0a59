"""Adapter state <-> on-disk keys, in Hugging Face PEFT's scheme.

On disk a key is "base_model.model." + the module's path in the user's model + the layer-local key with the
adapter name removed, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Each wrapper
knows its own local keys (`adapter_state_dict`), so no key is recognised by guessing from substrings.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import adapter_configs, all_wrappers
from .errors import AdapterFormatError
from .layer import AdapterLayer, ModulesToSaveWrapper, modules_outside_adapters

PREFIX = "base_model.model."


def _key_prefix(model: nn.Module, adapter_name: str) -> str:
    config = adapter_configs(model).get(adapter_name)
    return config.state_key_prefix if config is not None else PREFIX


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Tensors of one adapter under PEFT's on-disk keys (tensors are the live parameters, not copies)."""
    prefix = _key_prefix(model, adapter_name)
    state = {}
    for name, wrapper in all_wrappers(model):
        if isinstance(wrapper, AdapterLayer) and adapter_name not in wrapper.adapter_configs:
            continue  # another adapter's layer (adapters may target different modules)
        for key, tensor in wrapper.adapter_state_dict(adapter_name).items():
            state[key if _global_keys(wrapper) else f"{prefix}{name}.{key}"] = tensor
    return state


def _global_keys(wrapper: nn.Module) -> bool:
    return isinstance(wrapper, AdapterLayer) and wrapper.global_state_keys


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, source: str
) -> None:
    """Copy on-disk tensors into adapter `adapter_name`; every key must be used and every slot filled."""
    owners = {
        name: w
        for name, w in all_wrappers(model)
        if (isinstance(w, AdapterLayer) and adapter_name in w.adapter_configs)
        or (isinstance(w, ModulesToSaveWrapper) and adapter_name in w.modules_to_save)
    }
    # Model-level methods (prompt / prefix tuning) own un-prefixed keys such as PEFT's "prompt_embeddings".
    global_owners = {name: w for name, w in owners.items() if _global_keys(w)}
    global_keys = {k: name for name, w in global_owners.items() for k in w.adapter_state_dict(adapter_name)}
    for name, wrapper in global_owners.items():
        local = {k: state[k] for k, owner in global_keys.items() if owner == name and k in state}
        wrapper.load_adapter_state(adapter_name, local, where=f"{source}: {name}")
        del owners[name]
    state = {k: v for k, v in state.items() if k not in global_keys}
    prefix = _key_prefix(model, adapter_name)
    foreign = [k for k in state if not k.startswith(prefix)]
    if foreign:
        raise AdapterFormatError(
            f"{source}: {len(foreign)} key(s) lack the '{prefix}' prefix PEFT writes, e.g. {foreign[0]!r}; "
            "this is not a PEFT-format adapter file"
        )
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in owners}
    unexpected = []
    for key, tensor in state.items():
        path = key[len(prefix) :]
        owner = _owner_of(path, owners)
        if owner is None:
            unexpected.append(key)
        else:
            grouped[owner][path[len(owner) + 1 :]] = tensor
    missing = [name for name, local in grouped.items() if not local]
    if unexpected or missing:
        raise AdapterFormatError(
            f"{source}: the file does not fit the adapter its config describes: "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}, {len(missing)} module(s) without weights "
            f"{missing[:3]}. Check target_modules in adapter_config.json, or that this is the right base model."
        )
    for name, local in grouped.items():
        wrapper = owners[name]
        if isinstance(wrapper, AdapterLayer):
            wrapper.load_adapter_state(adapter_name, local, where=f"{source}: {name}")
        else:
            try:
                wrapper.load_adapter_state(adapter_name, local)
            except RuntimeError as exc:
                raise AdapterFormatError(f"{source}: modules_to_save {name!r}: {exc}") from exc


def _owner_of(path: str, owners: dict[str, nn.Module]) -> str | None:
    # Longest module path that prefixes the key at a '.' boundary.
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:cut])
        if candidate in owners:
            return candidate
    return None


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original key names, as if no wrapper were present."""
    wrappers = dict(all_wrappers(model))
    plain = {}
    # The keys model.state_dict() has, without building the adapters' part of it (large with many adapters).
    for module_name, module in modules_outside_adapters(model, dedupe=False):
        prefix = f"{module_name}." if module_name else ""
        tensors = list(module._parameters.items()) + [
            (k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set
        ]
        for key, tensor in tensors:
            clean = _clean_key(prefix + key, wrappers) if tensor is not None else None
            if clean is not None:
                plain[clean] = tensor.detach()
    return plain


def _clean_key(key: str, wrappers: dict[str, nn.Module]) -> str | None:
    """Drop the wrapper's inner segment (base_layer / original_module); None for adapter tensors."""
    parts = key.split(".")
    raw: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(parts):
        raw.append(parts[i])
        kept.append(parts[i])
        i += 1
        wrapper = wrappers.get(".".join(raw))
        if wrapper is not None and i < len(parts):
            inner = "base_layer" if isinstance(wrapper, AdapterLayer) else "original_module"
            if parts[i] != inner:
                return None  # an adapter tensor, not part of the base model
            raw.append(parts[i])
            i += 1
    return ".".join(kept)
