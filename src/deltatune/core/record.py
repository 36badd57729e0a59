"""deltatune.json as a typed record: what readers may rely on is declared once, here, and checked when a folder
is read (another tool's or a hostile file fails with the field's name instead of deep in a `.get` chain).

The JSON is unchanged: a record dumps exactly the keys it was built or read with (`exclude_unset`), and keys
this version does not know (a newer writer's) are kept, not dropped.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import AdapterFormatError


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class TargetRecord(_Part):
    shape: list[int] | None = None
    dtype: str | None = None


class BaseModelRecord(_Part):
    """The base an adapter was trained on (`provenance.base_fingerprint`)."""

    architecture: str | None = None
    model_type: str | None = None
    name_or_path: str | None = None
    num_parameters: int | None = None
    shapes_sha256: str | None = None
    targets: dict[str, TargetRecord] = Field(default_factory=dict)
    target_weights_sha256: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """As `provenance.base_fingerprint` returns it, for `compare_fingerprints`."""
        return self.model_dump(exclude_unset=True)


class Labels(_Part):
    id2label: dict[str, str]
    label2id: dict[str, int] = Field(default_factory=dict)


class Parameters(_Part):
    adapter: int | None = None
    model_total: int | None = None


class FileRecord(_Part):
    sha256: str | None = None
    bytes: int | None = None


class SourceRecord(_Part):
    path: str | None = None
    sha256: str | None = None


class DerivedFrom(_Part):
    """How `deltatune combine` / `convert` made the adapter: its method, sources and errors."""

    method: str | None = None
    parameters: dict[str, Any] | None = None
    sources: list[SourceRecord] = Field(default_factory=list)
    max_relative_error: float | None = None
    logits: dict[str, Any] | None = None  # max_abs_error, exact_max_abs_effect; None: not checked


class SweepRecord(_Part):
    """best/ of a `deltatune sweep`: which trial of which study, chosen by which rule."""

    study: str | None = None
    storage: str | None = None
    trial: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    metric: dict[str, Any] | None = None
    rule: str | None = None


class Provenance(_Part):
    """One adapter or model folder's deltatune.json."""

    schema_version: int
    created_at: str | None = None
    environment: dict[str, Any] = Field(default_factory=dict)
    adapter_name: str | None = None
    peft_type: str | None = None
    base_model: BaseModelRecord | None = None
    tokenizer_sha256: str | None = None
    quantization: dict[str, Any] | None = None
    data_sha256: str | None = None
    parameters: Parameters | None = None
    training_config: dict[str, Any] | None = None
    labels: Labels | None = None
    metrics: dict[str, Any] | None = None
    derived_from: DerivedFrom | None = None
    files: dict[str, FileRecord] | None = None
    sweep: SweepRecord | None = None

    @classmethod
    def parse(cls, data: dict[str, Any], source: str) -> Provenance:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise AdapterFormatError(
                f"{source}: {where}: {first['msg'].lower()} (got {str(first.get('input'))[:60]!r}); the record is "
                "damaged or not deltatune's: remove deltatune.json to load the folder as another tool's"
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_unset=True), indent=2, sort_keys=True, default=str)

    def file_sha256(self, name: str) -> str | None:
        entry = (self.files or {}).get(name)
        return entry.sha256 if entry is not None else None

    def trained_data(self) -> dict[str, Any]:
        """The data section of the config the adapter was trained with ({} when not recorded)."""
        data = (self.training_config or {}).get("data")
        return data if isinstance(data, dict) else {}

    def source_paths(self) -> list[str]:
        """The folders a combined or converted adapter was made from."""
        sources = self.derived_from.sources if self.derived_from is not None else []
        return [s.path for s in sources if s.path]
