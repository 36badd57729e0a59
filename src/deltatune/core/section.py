"""The base of every config section a user writes (YAML or keyword arguments): pydantic, unknown keys refused,
so a misspelt key is an error that names it rather than a setting silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
