"""Overwrite a loaded LoRA adapter in place with another saved adapter of the same layout (hot-swap).

A fresh load creates a pair of factor modules per targeted layer and copies the file into them. When an adapter
whose tensors have the same keys and shapes is already loaded and no longer needed, copying the file's
tensors into it is all the work there is: no module is created, the model is not walked again, and every
tensor keeps its identity (so graphs compiled or captured with it stay valid). HF PEFT calls this
hotswapping; `runtime.AdapterCache` uses it to reuse the tensors of adapters it unloaded.

Everything is checked before the first tensor is overwritten (file hash, layout, base model), so a refused
swap leaves the slot's adapter as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import patterns, provenance
from .adapters import adapter_configs, adapter_layers, store_config
from .capabilities import Capability, capability_refusal
from .config import CONFIG_NAME, AdapterConfig, load_config_file
from .errors import AdapterNameError, DeltatuneError
from .io import WEIGHTS_NAME, check_base, read_adapter_weights, read_provenance, resolve_adapter_folder
from .registry import get_method
from .state import adapter_state_dict

Layout = dict[str, tuple[int, ...]]  # on-disk key -> shape


class LayoutMismatch(DeltatuneError, ValueError):
    """The saved adapter's tensors do not correspond one to one to the loaded adapter's; load it fresh."""


def saved_layout(path: str | Path) -> Layout | None:
    """Keys and shapes of a saved adapter whose method declares hot-swapping (plain LoRA without
    modules_to_save, today), read from the config and the safetensors header only; None for anything else."""
    folder = Path(path)
    try:
        config = load_config_file(folder / CONFIG_NAME)
        if capability_refusal(config, Capability.HOTSWAP):
            return None
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except Exception:  # unreadable here: the fresh load that follows names the problem
        return None


class AdapterSlot:
    """A loaded LoRA adapter whose tensors other saved adapters of the same layout can be copied into.

    The base model must stay frozen while the slot is in use: its fingerprint for the slot's targets is
    computed once (kept in `fingerprints`) and compared with each incoming adapter's record.
    """

    def __init__(
        self, model: nn.Module, adapter_name: str, fingerprints: dict[tuple[str, ...], dict] | None = None
    ) -> None:
        config = adapter_configs(model).get(adapter_name)
        if config is None:
            raise AdapterNameError(
                f"no adapter named {adapter_name!r}; this model has {sorted(adapter_configs(model))}"
            )
        reason = capability_refusal(config, Capability.HOTSWAP)
        if reason:
            raise LayoutMismatch(
                f"adapter {adapter_name!r} ({config.peft_type}) cannot be hot-swapped: {reason}"
            )
        self.model = model
        self.adapter_name = adapter_name
        self.tensors = adapter_state_dict(model, adapter_name)  # the live tensors, under on-disk keys
        self.layout: Layout = {key: tuple(t.shape) for key, t in self.tensors.items()}
        self.layers = [
            (n, layer) for n, layer in adapter_layers(model) if adapter_name in layer.adapter_configs
        ]
        # Base fingerprints by target set, shareable between slots of one model (computing one walks the model).
        self.fingerprints = {} if fingerprints is None else fingerprints

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def fits(self, layout: Layout | None) -> bool:
        return layout == self.layout

    def overwrite(
        self,
        path: str | Path,
        *,
        allow_base_mismatch: bool = False,
        tokenizer: Any = None,
        tokenizer_sha256: str | None = None,
    ) -> AdapterConfig:
        """Copy the adapter saved at `path` into this slot and adopt its config; returns that config. The
        tokenizer is checked like load_adapter does; `tokenizer_sha256`, its hash computed once, spares
        hashing it per swap (~20 ms for a 49k vocabulary)."""
        folder = resolve_adapter_folder(path)
        config = load_config_file(folder / CONFIG_NAME)
        reason = capability_refusal(config, Capability.HOTSWAP)
        if reason:
            raise LayoutMismatch(
                f"{folder} ({config.peft_type}) cannot be hot-swapped: {reason}; load it fresh"
            )
        method = get_method(config.peft_type)
        config = method.resolve_config(self.model, config)
        record = read_provenance(folder)
        state = read_adapter_weights(folder, record=record)
        with patterns.match_budget():
            method.check_saved_state(self.model, config, state, str(folder))
        layout = {key: tuple(t.shape) for key, t in state.items()}
        if layout != self.layout:
            differing = sorted(set(layout) ^ set(self.layout)) or [
                k for k in layout if layout[k] != self.layout[k]
            ]
            raise LayoutMismatch(
                f"{folder}: its tensors differ from adapter {self.adapter_name!r}'s (first: {differing[0]}); "
                "load it fresh"
            )
        if record is not None:
            targets = tuple(name for name, _ in self.layers)
            if targets not in self.fingerprints:
                self.fingerprints[targets] = provenance.base_fingerprint(self.model, list(targets))
            check_base(
                self.model,
                record,
                self.adapter_name,
                allow_base_mismatch,
                folder,
                tokenizer,
                self.fingerprints[targets],
                tokenizer_sha256,
            )
        with torch.no_grad():
            for key, tensor in self.tensors.items():
                tensor.copy_(state[key])
        with patterns.match_budget():
            for module_name, layer in self.layers:
                layer.reconfigure(self.adapter_name, config, module_name)
        store_config(self.model, self.adapter_name, config)
        return config


def overwrite_adapter(
    model: nn.Module,
    adapter_name: str,
    path: str | Path,
    *,
    allow_base_mismatch: bool = False,
    tokenizer: Any = None,
) -> AdapterConfig:
    """Replace loaded LoRA adapter `adapter_name`'s weights and config by the adapter saved at `path`, in place.

    The saved adapter must have exactly the same tensor keys and shapes (same targets and ranks), else
    `LayoutMismatch`; it is checked against the base model like `load_adapter` does. Which adapters are
    active is unchanged.
    """
    return AdapterSlot(model, adapter_name).overwrite(
        path, allow_base_mismatch=allow_base_mismatch, tokenizer=tokenizer
    )
