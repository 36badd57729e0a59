"""AdapterMethod: what a method file registers. Core code talks to methods only through this interface."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .config import AdapterConfig
from .layer import AdapterLayer


class AdapterMethod:
    """A PEFT method: its config class, which modules it can wrap, and how to wrap one."""

    peft_type: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    layer_class: ClassVar[type[AdapterLayer]] = AdapterLayer
    # Human-readable list of wrappable module types, used in error messages.
    supported_modules: ClassVar[str] = ""

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> AdapterLayer:
        """Return a new wrapper around `module` with no adapters yet."""
        raise NotImplementedError

    @classmethod
    def reserved_names(cls) -> set[str]:
        """Names adapters may not take, because they are attribute names inside the wrapper."""
        return set(cls.layer_class.adapter_attributes) | {"base_layer"}
