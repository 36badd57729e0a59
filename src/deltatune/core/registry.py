"""peft_type -> method: the one extension point.

A method module ends with `register("LORA")(ItsMethod)`; nothing else in deltatune needs editing to add a
method. The built-in methods register the first time the registry is asked (`deltatune.methods` is imported
by name then, the way a plugin is loaded), so `import deltatune` stays light and core imports no method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import AdapterConfigError

if TYPE_CHECKING:
    from .method import AdapterMethod

_METHODS: dict[str, type[AdapterMethod]] = {}
M = TypeVar("M", bound="type[AdapterMethod]")
BUILTIN_METHODS = "deltatune.methods"


def _load_builtin_methods() -> None:
    importlib.import_module(BUILTIN_METHODS)  # cached by Python after the first call


def register(peft_type: str) -> Callable[[M], M]:
    """Class decorator that makes a method available under `peft_type` (PEFT's spelling, e.g. "LORA")."""

    def decorator(cls: M) -> M:
        key = peft_type.upper()
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"peft_type {key!r} is already registered by {_METHODS[key].__qualname__}")
        cls.peft_type = key
        cls.config_class.peft_type = key
        _METHODS[key] = cls
        return cls

    return decorator


def get_method(peft_type: str) -> type[AdapterMethod]:
    _load_builtin_methods()
    key = str(peft_type).upper()
    if key not in _METHODS:
        raise AdapterConfigError(
            f"unknown peft_type {peft_type!r}; registered methods: {sorted(_METHODS)}. "
            "A new method registers itself with @deltatune.core.registry.register(...)."
        )
    return _METHODS[key]


def registered_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)
