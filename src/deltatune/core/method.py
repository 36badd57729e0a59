"""AdapterMethod: what a method file registers. Core code talks to methods only through this interface."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .capabilities import Capability
from .config import AdapterConfig
from .errors import TargetingError
from .layer import AdapterLayer
from .targeting import TargetPreview, select_targets


class AdapterMethod:
    """A PEFT method: its config class, which modules it can wrap, how to wrap one, and what it can do."""

    peft_type: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    layer_class: ClassVar[type[AdapterLayer]] = AdapterLayer
    # Human-readable list of wrappable module types, used in error messages.
    supported_modules: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    # Why a capability the method lacks cannot be had (said to the user); a generic sentence otherwise.
    lacks: ClassVar[dict[Capability, str]] = {}

    @classmethod
    def refusal(cls, capability: Capability, config: AdapterConfig) -> str | None:
        """Why an adapter with `config` cannot `capability`, or None when it can. Methods whose answer
        depends on the config (DoRA, a bottleneck's non-linearity) extend this."""
        if capability not in cls.capabilities:
            return cls.lacks.get(capability) or f"{cls.peft_type} adapters cannot {capability.value}"
        if config.modules_to_save and capability in (Capability.MIXED_BATCH, Capability.HOTSWAP):
            return "it has modules_to_save (a full copy of each listed module per adapter)"
        return None

    @classmethod
    def resolve_config(cls, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """The config with everything the model implies filled in (shapes, default targets). Returns a new
        object when it changes anything, so the caller's config is never mutated."""
        return config

    @classmethod
    def preview(cls, model: nn.Module, config: AdapterConfig) -> TargetPreview:
        """Which modules `inject` would wrap. Layer methods resolve `target_modules`; model-level methods
        override this with the one module they live in."""
        return select_targets(
            model,
            config,
            cls.can_wrap,
            cls.supported_modules,
            is_wrapped=lambda m: isinstance(m, cls.layer_class),
        )

    @classmethod
    def check_saved_state(
        cls, model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor], source: str
    ) -> None:
        """Before a saved adapter is injected: refuse a config whose sizes (ranks, token counts) disagree with
        the saved tensors, so a hostile or mismatched config cannot make `inject` allocate what it asks for.
        Methods whose sizes come from the model alone need not override this."""

    @classmethod
    def attach(cls, model: nn.Module, wrappers: list[AdapterLayer]) -> None:
        """Called after `inject` wrapped its targets; model-level methods install their hooks here."""

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> AdapterLayer:
        """Return a new wrapper around `module` with no adapters yet."""
        raise NotImplementedError

    @classmethod
    def wrap_parameter(cls, module: nn.Module, parameter_name: str) -> AdapterLayer:
        """Return a new wrapper that adapts `module`'s parameter `parameter_name` (LoRA's target_parameters)."""
        raise TargetingError(f"{cls.peft_type} adapts layers, not parameters; target_parameters is LoRA's")

    @classmethod
    def reserved_names(cls) -> set[str]:
        """Names adapters may not take, because they are attribute names inside the wrapper."""
        return set(cls.layer_class.adapter_attributes) | {"base_layer"}
