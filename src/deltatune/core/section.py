"""The base of every config section a user writes (YAML or keyword arguments): pydantic, unknown keys refused,
so a misspelt key is an error that names it rather than a setting silently ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"training": {"max_steps": 5}} -> {"training.max_steps": 5}: a config's keys as overrides name them
    (comparing two configs key by key, or trackers whose parameters are flat)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
