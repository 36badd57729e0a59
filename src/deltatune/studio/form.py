"""The launch form, built from the training config's own pydantic models: every field of every section is
an input (a field added to the config appears here by itself), and what the form sends becomes the same raw
mapping a YAML file would, checked by the same `validate_config` the command line uses."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ..task.config import TrainConfig

ADAPTER_EXTRA = "adapter.settings"  # the method's own keys (r, lora_alpha, target_modules, ...), as YAML


@dataclass(frozen=True)
class FormField:
    name: str  # dotted path: training.max_steps
    kind: str  # select | number | text | yaml
    options: tuple[Any, ...] = ()  # a select's values
    default: Any = None
    required: bool = False

    @property
    def shown_default(self) -> str:
        if self.required:
            return "required"
        if self.kind == "yaml":
            return yaml.safe_dump(self.default, default_flow_style=True).strip()
        return "" if self.default is None else str(self.default)


@dataclass(frozen=True)
class FormSection:
    name: str
    fields: tuple[FormField, ...]
    optional: bool = False  # a section that is absent unless one of its fields is given


def _section_type(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model a field holds, and whether it may be None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1 and type(None) in args and len(args) == 2:
            return models[0], True
    return None, False


def _leaf(name: str, annotation: Any, default: Any, required: bool) -> FormField:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: an X left empty is None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is Literal:
        return FormField(name, "select", typing.get_args(annotation), default, required)
    if annotation is bool:
        return FormField(name, "select", (True, False), default, required)
    if annotation in (int, float):
        return FormField(name, "number", (), default, required)
    if annotation is str:
        return FormField(name, "text", (), default, required)
    return FormField(name, "yaml", (), default, required)


def _fields(model: type[BaseModel], prefix: str) -> list[FormField | FormSection]:
    out: list[FormField | FormSection] = []
    for key, info in model.model_fields.items():
        name = f"{prefix}{key}"
        section, optional = _section_type(info.annotation)
        if section is not None:
            inner = _fields(section, f"{name}.")
            leaves = tuple(f for f in inner if isinstance(f, FormField))
            out.append(FormSection(name, leaves, optional))
            out += [s for s in inner if isinstance(s, FormSection)]
            continue
        default = None if info.default is PydanticUndefined else info.default
        if info.default_factory is not None:
            default = info.default_factory()
        out.append(_leaf(name, info.annotation, default, info.is_required()))
    return out


def form_sections() -> list[FormSection]:
    """The launch form: one section per config section (nested ones after their parent), top-level fields
    such as output_dir in a last section of their own."""
    items = _fields(TrainConfig, "")
    sections = [i for i in items if isinstance(i, FormSection)]
    top = tuple(i for i in items if isinstance(i, FormField))
    adapter = next(s for s in sections if s.name == "adapter")
    extra = FormField(ADAPTER_EXTRA, "yaml", (), None, False)
    sections[sections.index(adapter)] = FormSection("adapter", (*adapter.fields, extra))
    return [*sections, FormSection("run", top)]


def all_fields() -> dict[str, FormField]:
    return {f.name: f for s in form_sections() for f in s.fields}


class FormError(ValueError):
    """A form value that cannot be read (before the config's own checks)."""


def raw_config(values: dict[str, str]) -> dict[str, Any]:
    """The form's non-empty values as the nested mapping a YAML file would hold. Empty fields are left out,
    so the config's defaults apply, as they do for a key a YAML file does not name."""
    fields = all_fields()
    raw: dict[str, Any] = {}
    for name, text in values.items():
        field = fields.get(name)
        if field is None or not str(text).strip():
            continue
        value = _parse(field, str(text))
        if name == ADAPTER_EXTRA:
            if not isinstance(value, dict):
                raise FormError(f"{ADAPTER_EXTRA}: expected a YAML mapping like 'r: 8', got {text!r}")
            raw.setdefault("adapter", {}).update(value)
            continue
        node = raw
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def _parse(field: FormField, text: str) -> Any:
    if field.kind == "select":
        for option in field.options:
            if str(option) == text:
                return option
        raise FormError(f"{field.name}: {text!r} is not one of {list(field.options)}")
    if field.kind == "text":
        return text
    if field.kind == "number":  # as Python reads numbers: YAML would take 3e-3 for a string
        for kind in (int, float):
            try:
                return kind(text.strip())
            except ValueError:
                continue
        if text.strip() in ("null", "None", "~"):
            return None
        raise FormError(f"{field.name}: {text!r} is not a number")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FormError(f"{field.name}: not valid YAML ({str(exc).splitlines()[0]})") from None


def config_yaml(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
