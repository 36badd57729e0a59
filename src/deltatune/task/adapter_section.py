"""A config's adapter section checked against its method, before any model exists: the method is registered,
every key is one of its config's fields, and its own value checks pass."""

from __future__ import annotations

import dataclasses

from ..core.config import AdapterConfig
from ..core.registry import get_method, registered_methods
from .config import FULL_FINE_TUNING, AdapterSpec, ConfigError


def _method_config_class(method: str) -> type[AdapterConfig]:
    try:
        return get_method(method.upper()).config_class
    except Exception:
        known = ", ".join([FULL_FINE_TUNING, *sorted(m.lower() for m in registered_methods())])
        raise ConfigError(
            f"adapter.method={method!r} is not a known method; choose one of: {known}"
        ) from None


def check_adapter_section(spec: AdapterSpec) -> type[AdapterConfig] | None:
    """The adapter section's method exists and every key is one of its fields (the method's config class;
    None for method: full). Needs no model, so `validate_config` runs it before anything is loaded."""
    if spec.full:
        if spec.model_extra:
            raise ConfigError(f"adapter.method=full takes no other keys, got {sorted(spec.model_extra)}")
        return None
    cls = _method_config_class(spec.method)
    allowed = {f.name for f in dataclasses.fields(cls)} - {
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    }
    unknown = sorted(set(spec.model_extra or {}) - allowed)
    if unknown:
        error = ConfigError(
            f"unknown key(s) {unknown} in adapter (method {spec.method}); allowed: {', '.join(sorted(allowed))}"
        )
        error.keys = unknown  # which keys, for a message that names the override that set them
        raise error
    missing = [k for k in cls.required_keys if k not in (spec.model_extra or {})]
    if missing:
        error = ConfigError(
            f"adapter (method {spec.method}) is missing required key(s) {missing}; "
            f"{spec.method} needs {', '.join(cls.required_keys)}"
        )
        error.keys = missing
        raise error
    fields = dict(spec.model_extra or {})
    if str(fields.get("prompt_tuning_init") or "").upper() == "TEXT":
        fields.setdefault("tokenizer_name_or_path", "the base model's")  # build_adapter_config fills it in
    try:  # the method's own value checks (r > 0, ...), which need no model
        cls.from_dict({"peft_type": cls.peft_type, **fields}, source="adapter section")
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith("adapter section") else f"adapter section: {message}"
        ) from None
    return cls
