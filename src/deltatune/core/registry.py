"""peft_type -> method: the one extension point.

A method module ends with `register("LORA")(ItsMethod)`; nothing else in deltatune needs editing to add a
method. Built-in methods register when `deltatune` is imported (its __init__ imports `deltatune.methods`), so
core never imports a method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import AdapterConfigError

if TYPE_CHECKING:
    from .method import AdapterMethod

_METHODS: dict[str, type[AdapterMethod]] = {}
M = TypeVar("M", bound="type[AdapterMethod]")


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
    key = str(peft_type).upper()
    if key not in _METHODS:
        raise AdapterConfigError(
            f"unknown peft_type {peft_type!r}; registered methods: {sorted(_METHODS)}. "
            "A new method registers itself with @deltatune.core.registry.register(...)."
        )
    return _METHODS[key]


def registered_methods() -> list[str]:
    return sorted(_METHODS)
