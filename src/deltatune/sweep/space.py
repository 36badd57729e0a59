"""The search space of a sweep: which config keys vary, over what, and when.

SPACE.yaml maps a name to a spec. A name that is a dotted config path (`optim.lr`, `adapter.r`) sets that key;
any other name is a preset switch whose choices each set several keys (a whole `adapter` section, say: DoRA is
LoRA with `use_dora: true`). Specs:

    method:                     # a preset switch: each choice is {dotted key: value}
      presets:
        lora: {adapter: {method: lora, target_modules: [query, value]}}
        dora: {adapter: {method: lora, target_modules: [query, value], use_dora: true}}
    adapter.r: {int: [1, 64], log: true, when: {method: [lora, dora]}}
    optim.lr: {float: [1.0e-4, 3.0e-3], log: true}
    training.batch_size: {choices: [16, 32]}

`when` makes a parameter conditional on earlier ones (it is sampled, and set, only when each named parameter took
one of the listed values). Every spec is checked, and every corner of the space (each combination of choices,
with each range at both ends) is validated as a training config before the first trial, so a key that does not
exist or a value the method refuses fails at once, naming the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..core.errors import DeltatuneError
from ..task.config import set_key

if TYPE_CHECKING:
    import optuna

SPEC_KINDS = ("choices", "presets", "int", "float")
SPEC_KEYS = {*SPEC_KINDS, "log", "step", "when"}
MAX_CORNERS = 4096  # corners validated before the first trial; past this only a seeded sample of them


class SpaceError(DeltatuneError, ValueError):
    """SPACE.yaml is malformed, or names a key or value the training config refuses."""


@dataclass(frozen=True)
class Param:
    """One searched dimension."""

    name: str
    kind: str  # one of SPEC_KINDS
    choices: tuple[Any, ...] = ()  # for choices; for presets, the preset labels
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(name in chosen and chosen[name] in allowed for name, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind in ("choices", "presets"):
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> tuple[Any, ...]:
        """The values that bound what this parameter can set: every choice, or both ends of the range."""
        if self.numeric:
            ends = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
            return ends
        return self.choices

    def settings(self, value: Any) -> dict[str, Any]:
        """The config keys this parameter's value sets."""
        return dict(self.presets[value]) if self.kind == "presets" else {self.name: value}


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = "space"  # the file it came from, for messages

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's values, in the space's order; a conditional parameter only when its condition holds."""
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.active(chosen):
                chosen[param.name] = param.suggest(trial)
        return chosen

    def apply(self, raw_config: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
        """A copy of the config with the chosen values set: presets first (they may replace whole sections),
        then the single keys, so `adapter.r` lands inside the adapter section a preset chose."""
        result = copy.deepcopy(raw_config)
        ordered = sorted(self.params, key=lambda p: p.kind != "presets")
        for param in ordered:
            if param.name in chosen:
                for key, value in param.settings(chosen[param.name]).items():
                    set_key(result, key.split("."), copy.deepcopy(value), f"space parameter {param.name!r}")
        return result

    def corner_assignments(self) -> list[dict[str, Any]]:
        """Every combination of corner values, conditional parameters only where active (deduplicated)."""
        partial: list[dict[str, Any]] = [{}]
        for param in self.params:
            grown = []
            for chosen in partial:
                if param.active(chosen):
                    grown.extend({**chosen, param.name: v} for v in param.corners())
                else:
                    grown.append(chosen)
            partial = grown
            if len(partial) > MAX_CORNERS * 4:
                partial = partial[: MAX_CORNERS * 4]
        unique = {tuple(sorted((k, repr(v)) for k, v in c.items())): c for c in partial}
        corners = list(unique.values())
        if len(corners) > MAX_CORNERS:
            import random

            corners = random.Random(0).sample(corners, MAX_CORNERS)
        return corners


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpaceError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _parse_range(name: str, spec: dict[str, Any], kind: str) -> dict[str, Any]:
    bounds = spec[kind]
    where = f"space parameter {name!r}"
    if not (isinstance(bounds, list) and len(bounds) == 2):
        raise SpaceError(f"{where}: `{kind}` must be [low, high], got {bounds!r}")
    low, high = (_number(b, where) for b in bounds)
    if kind == "int" and not all(float(b).is_integer() for b in (low, high)):
        raise SpaceError(f"{where}: `int` bounds must be whole numbers, got {bounds!r}")
    if not low < high:
        raise SpaceError(f"{where}: low {bounds[0]!r} must be below high {bounds[1]!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: `log` must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0, got {bounds[0]!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, where)
        if step <= 0 or (kind == "int" and not step.is_integer()):
            raise SpaceError(f"{where}: `step` must be a positive {'whole ' if kind == 'int' else ''}number")
        if log:
            raise SpaceError(
                f"{where}: `step` and `log: true` cannot be combined (Optuna samples one or the other)"
            )
    return {"low": low, "high": high, "log": log, "step": step}


def _parse_choices(name: str, spec: dict[str, Any], kind: str) -> dict[str, Any]:
    where = f"space parameter {name!r}"
    if kind == "presets":
        presets = spec["presets"]
        if not (isinstance(presets, dict) and presets):
            raise SpaceError(f"{where}: `presets` must map each choice's name to the keys it sets")
        for label, settings in presets.items():
            if not (isinstance(settings, dict) and settings and all(isinstance(k, str) for k in settings)):
                raise SpaceError(f"{where}: preset {label!r} must map dotted config keys to values")
        return {"choices": tuple(presets), "presets": {str(k): v for k, v in presets.items()}}
    choices = spec["choices"]
    if not (isinstance(choices, list) and choices):
        raise SpaceError(f"{where}: `choices` must be a non-empty list")
    for value in choices:
        if value is not None and not isinstance(value, str | int | float | bool):
            raise SpaceError(
                f"{where}: choice {value!r} is not a plain value (Optuna stores str, int, float, bool or "
                "null); to set several keys at once, use `presets`"
            )
    if len({repr(c) for c in choices}) != len(choices):
        raise SpaceError(f"{where}: `choices` lists a value twice")
    return {"choices": tuple(choices)}


def _parse_param(name: str, spec: Any, earlier: dict[str, Param]) -> Param:
    where = f"space parameter {name!r}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected a mapping with one of {', '.join(SPEC_KINDS)}, got {spec!r}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    kinds = [k for k in SPEC_KINDS if k in spec]
    if len(kinds) != 1:
        raise SpaceError(f"{where}: give exactly one of {', '.join(SPEC_KINDS)} (got {kinds or 'none'})")
    kind = kinds[0]
    if kind == "presets" and "." in name:
        raise SpaceError(
            f"{where}: a preset switch's name must not be a dotted config key; name it e.g. 'method'"
        )
    if kind in ("choices", "presets") and ({"log", "step"} & set(spec)):
        raise SpaceError(f"{where}: `log` and `step` apply to int and float ranges only")
    fields = _parse_range(name, spec, kind) if kind in ("int", "float") else _parse_choices(name, spec, kind)
    return Param(name=name, kind=kind, when=_parse_when(name, spec.get("when"), earlier), **fields)


def _parse_when(name: str, when: Any, earlier: dict[str, Param]) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    where = f"space parameter {name!r}: `when`"
    if not (isinstance(when, dict) and when):
        raise SpaceError(f"{where} must map earlier parameters to the values that switch this one on")
    parsed = {}
    for other, values in when.items():
        if other not in earlier:
            raise SpaceError(
                f"{where} names {other!r}, which is not a parameter defined above it; defined: "
                f"{', '.join(earlier) or 'none'}"
            )
        values = values if isinstance(values, list) else [values]
        source = earlier[other]
        if source.numeric:
            raise SpaceError(f"{where}: {other!r} is a range; conditions may only name choices or presets")
        missing = [v for v in values if v not in source.choices]
        if missing:
            raise SpaceError(
                f"{where}: {other!r} never takes {missing}; its choices are {list(source.choices)}"
            )
        parsed[other] = tuple(values)
    return parsed


def parse_space(data: Any, source: str = "space") -> SearchSpace:
    if not (isinstance(data, dict) and data):
        raise SpaceError(f"{source}: the top level must map parameter names to specs, got {data!r}")
    params: dict[str, Param] = {}
    for name, spec in data.items():
        if not isinstance(name, str) or not name:
            raise SpaceError(f"{source}: parameter names must be strings, got {name!r}")
        params[name] = _parse_param(name, spec, params)
    return SearchSpace(tuple(params.values()), source)


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path} is not valid YAML: {exc}") from None
    return parse_space(data, str(path))


def check_space(space: SearchSpace, raw_config: dict[str, Any], source: str | None = None) -> int:
    """Validate every corner of the space as a training config; return how many were checked."""
    from ..task.config import ConfigError, validate_config

    corners = space.corner_assignments()
    for chosen in corners:
        try:
            validate_config(space.apply(raw_config, chosen), source="trial config")
        except ConfigError as exc:
            setting = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
            raise SpaceError(
                f"{source or space.source}: the trial with {setting} would be an invalid config:\n{exc}\n"
                "Fix the key or value it names; if a key only applies to some choices, add a `when:` "
                "condition to it."
            ) from None
    return len(corners)
