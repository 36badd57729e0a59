"""AdapterConfig: the base of every method's config, with PEFT field names and a JSON round trip.

Loading rules (what PEFT does, made stricter where silence would give wrong numbers):
- a key deltatune has never heard of: warn and ignore;
- a PEFT field for a feature deltatune lacks, left at PEFT's neutral default: ignore quietly;
- the same field set to something that changes the math: error, since ignoring it would give other outputs;
- a required key missing: error naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from .errors import AdapterConfigError, DeltatuneWarning

CONFIG_NAME = "adapter_config.json"

# Adapter folders come from other people: bounds on what a config file may hold before anything is built.
MAX_CONFIG_BYTES = 1 << 20
MAX_LIST_ITEMS = 4096

# PEFT bookkeeping fields that never change the math.
_PEFT_BOOKKEEPING = {"peft_version", "auto_mapping", "megatron_core", "qalora_group_size"}


def _is_neutral(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass
class AdapterConfig:
    """Fields every method shares. `peft_type` is set by `@register` on the method."""

    peft_type: ClassVar[str] = ""
    # Keys that must be present in an adapter_config.json for it to be interpreted unambiguously.
    required_keys: ClassVar[tuple[str, ...]] = ()
    # PEFT fields deltatune does not implement; harmless at neutral values, an error otherwise.
    peft_only_fields: ClassVar[frozenset[str]] = frozenset()
    # What PEFT puts in front of a module path in the weights file. Its prompt-learning methods wrap the model
    # one level less deep, so theirs is "base_model." (e.g. `base_model.classifier.weight`).
    state_key_prefix: ClassVar[str] = "base_model.model."

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Every field holds what its annotation says (ints are no bools, floats are finite, lists are
        bounded), so a hostile or damaged file fails here with the field's name, not deep inside a model."""
        for name, (checker, annotation, union) in _field_checkers(type(self)).items():
            value = getattr(self, name)
            problem = _type_problem(value, checker, union)
            if problem:
                raise AdapterConfigError(
                    f"{name} must be {_describe(annotation)}, got {_shown(value)} ({problem})"
                )

    def validate(self) -> None:
        """Raise AdapterConfigError on values no model could use. Subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        data = {"peft_type": self.peft_type}
        data.update(dataclasses.asdict(self))
        return data

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> AdapterConfig:
        """Build a config of this class from a PEFT-style dict, applying the loading rules above."""
        data = dict(data)
        declared = data.pop("peft_type", cls.peft_type)
        if str(declared).upper() != cls.peft_type:
            raise AdapterConfigError(f"{source}: peft_type is {declared!r}, expected {cls.peft_type!r}")
        missing = [k for k in cls.required_keys if k not in data]
        if missing:
            raise AdapterConfigError(
                f"{source}: required key(s) {missing} missing; a {cls.peft_type} config needs "
                f"{list(cls.required_keys)}. Re-save the adapter or add the keys by hand."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown, unsupported = {}, [], []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_BOOKKEEPING or (key in cls.peft_only_fields and _is_neutral(value)):
                continue
            elif key in cls.peft_only_fields:
                unsupported.append(f"{key}={value!r}")
            else:
                unknown.append(key)
        if unsupported:
            raise AdapterConfigError(
                f"{source}: uses PEFT feature(s) deltatune does not implement: {', '.join(unsupported)}. "
                "Ignoring them would silently change the outputs; remove them only if you know they are unused."
            )
        if unknown:
            warnings.warn(
                f"{source}: ignoring unknown key(s) {sorted(unknown)}", DeltatuneWarning, stacklevel=2
            )
        return cls(**kwargs)


# pydantic checks the types: strict (an int is no bool, a float is no string), finite floats, lists bounded.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
_PLAIN = (bool, int, float, str, type(None))


def _checked(annotation: Any) -> Any:
    """The annotation as pydantic checks it: lists and dicts bounded to MAX_LIST_ITEMS entries; a type other
    than those JSON holds (a Literal, say) left to `validate()`, which names the allowed values."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_checked(a) for a in args)]  # noqa: UP007 (built from a tuple)
    if annotation is list or origin is list:
        (item,) = args or (Any,)
        return Annotated[list[_checked(item)], Field(max_length=MAX_LIST_ITEMS)]
    if annotation is dict or origin is dict:
        key, item = args or (Any, Any)
        return Annotated[dict[_checked(key), _checked(item)], Field(max_length=MAX_LIST_ITEMS)]
    return annotation if annotation in _PLAIN else Any


@functools.cache
def _field_checkers(cls: type) -> dict[str, tuple[TypeAdapter, Any, bool]]:
    """A config class's fields: (checker, annotation, whether it is a union), built once per class."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: (
            TypeAdapter(_checked(hints[f.name]), config=_STRICT),
            hints[f.name],
            typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType),
        )
        for f in dataclasses.fields(cls)
    }


def _type_problem(value: Any, checker: TypeAdapter, union: bool) -> str | None:
    """Why `value` does not pass `checker` (None: it does), in a few words: the problem of the union member
    of the value's own shape where there is one (a list with a bad entry, not "not a string")."""
    try:
        checker.validate_python(value)
        return None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = [part for part in error["loc"][1 if union else 0 :] if isinstance(part, (int, str))]
            kind = {"finite_number": "not finite", "too_long": f"over {MAX_LIST_ITEMS} entries"}.get(
                error["type"], "wrong type"
            )
            problems.append(f"entry {_shown(where[-1])}: {kind}" if where else kind)
        return next((p for p in problems if p != "wrong type"), "wrong type")


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return text if not isinstance(annotation, type) else annotation.__name__


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_json_object(path: Path, what: str, error: type[Exception] = AdapterConfigError) -> dict[str, Any]:
    """A JSON object from a file someone else may have written: bounded in size, UTF-8, not nested beyond
    what the parser can take. Every problem is `error` naming the file."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise error(
            f"{path}: {size} bytes is too large for {what} (limit {MAX_CONFIG_BYTES}); is it the right file?"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); {what} must be UTF-8 JSON"
        ) from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc}); the file is corrupted or truncated") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be {what}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> AdapterConfig:
    """Dispatch on `peft_type` to the registered method's config class."""
    from .registry import get_method

    if "peft_type" not in data:
        raise AdapterConfigError(f"{source}: required key 'peft_type' missing (e.g. \"LORA\")")
    if not isinstance(data["peft_type"], str):
        raise AdapterConfigError(
            f'{source}: peft_type must be a string such as "LORA", got {_shown(data["peft_type"])}'
        )
    return get_method(data["peft_type"]).config_class.from_dict(data, source=source)


def load_config_file(path: str | Path) -> AdapterConfig:
    path = Path(path)
    data = read_json_object(path, "an adapter config")
    try:
        return config_from_dict(data, source=str(path))
    except AdapterConfigError as exc:
        if str(path) in str(exc):
            raise
        raise AdapterConfigError(f"{path}: {exc}") from None


__all__ = ["AdapterConfig", "CONFIG_NAME", "config_from_dict", "load_config_file", "read_json_object"]
