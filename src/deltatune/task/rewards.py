"""Rewards a program can check, for `training.objective: grpo`.

A reward is a callable `(prompts, completions, **fields) -> list[float]`, TRL's signature: one prompt text and
one completion text per sampled completion, and each row field as a list beside them (the data row's columns,
`reference`: the row's expected answer as the output template renders it, and `completion_ids`). A reward is
named in the YAML by a built-in name or as `module:function`, with a weight and keyword options:

    rewards:
      - json_match
      - {name: length_penalty, weight: 0.5, options: {max_tokens: 12}}
      - {name: my_rewards:cites_source}

The fields a reward needs are the parameters of its signature after the first two that have no default; a
data row without one is malformed (named and counted at load), so a reward never meets a row it cannot score.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..core.errors import DeltatuneError

RewardFunction = Callable[..., Sequence[float]]


class RewardError(DeltatuneError, ValueError):
    """A reward is unknown, cannot be imported, or returned what cannot be trained on."""


def _as_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def json_valid(prompts: list[str], completions: list[str], reference: list[str]) -> list[float]:
    """1 for a JSON object with exactly the reference's keys (the eval metric's rule), else 0."""
    out = []
    for completion, expected in zip(completions, reference, strict=True):
        got, want = _as_json(completion.strip()), _as_json(expected.strip())
        same_shape = isinstance(got, dict) and isinstance(want, dict) and got.keys() == want.keys()
        out.append(float(same_shape))
    return out


def json_match(prompts: list[str], completions: list[str], reference: list[str]) -> list[float]:
    """1 when the completion and the reference are equal as JSON values (the eval metric's rule), else 0."""
    out = []
    for completion, expected in zip(completions, reference, strict=True):
        got = _as_json(completion.strip())
        out.append(float(got is not None and got == _as_json(expected.strip())))
    return out


def exact_match(prompts: list[str], completions: list[str], reference: list[str]) -> list[float]:
    """1 when the completion equals the reference after stripping surrounding whitespace, else 0."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, reference, strict=True)]


def regex(prompts: list[str], completions: list[str], *, pattern: str) -> list[float]:
    """1 when the whole completion (stripped) matches `pattern`, else 0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(
    prompts: list[str], completions: list[str], completion_ids: list[list[int]], *, max_tokens: int,
    soft_tokens: int = 0,
) -> list[float]:  # fmt: skip
    """DAPO's soft overlong punishment: 0 up to `max_tokens - soft_tokens` tokens, falling linearly to -1 at
    `max_tokens`, and -1 beyond it."""
    start = max_tokens - soft_tokens
    out = []
    for ids in completion_ids:
        length = len(ids)
        if length <= start:
            out.append(0.0)
        elif length <= max_tokens and soft_tokens:
            out.append((start - length) / soft_tokens)
        else:
            out.append(-1.0)
    return out


BUILT_IN: dict[str, RewardFunction] = {
    "json_valid": json_valid,
    "json_match": json_match,
    "exact_match": exact_match,
    "regex": regex,
    "length_penalty": length_penalty,
}
# what the trainer passes to every reward besides the data row's own columns
PROVIDED_FIELDS = frozenset({"completion_ids"})


@dataclass
class Reward:
    name: str  # as the YAML names it: the key of its curve in metrics.jsonl (reward/NAME)
    weight: float
    function: RewardFunction  # options bound
    fields: list[str] = field(default_factory=list)  # row fields it reads, besides prompts and completions
    every_field: bool = False  # it takes **kwargs: it gets every column, as TRL passes the whole row


def resolve_function(name: str) -> RewardFunction:
    """A built-in reward, or `module:function` imported (the module's own error, once, if it fails)."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise RewardError(
            f"unknown reward {name!r}; the built-ins are {sorted(BUILT_IN)}, or name your own as module:function"
        )
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: any error it raises is the message
        raise RewardError(
            f"reward {name!r}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardError(f"reward {name!r}: module {module_name!r} has no function {attribute!r}")
    return function


def _needed_fields(name: str, function: RewardFunction, options: dict[str, Any]) -> tuple[list[str], bool]:
    """The signature's parameters after (prompts, completions) without a default and not given as options,
    and whether it takes **kwargs."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return [], False
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(named) < 2 or named[0].kind is inspect.Parameter.KEYWORD_ONLY:
        raise RewardError(
            f"reward {name!r} must take (prompts, completions, ...) first: one text per completion each"
        )
    allowed = {p.name for p in named[2:]}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    unknown = sorted(set(options) - allowed) if not takes_any else []
    if unknown:
        raise RewardError(f"reward {name!r} takes no option {unknown}; its parameters are {sorted(allowed)}")
    return [p.name for p in named[2:] if p.default is p.empty and p.name not in options], takes_any


def load_rewards(specs: Sequence[Any], max_completion_length: int) -> list[Reward]:
    """The configured rewards, imported and checked, before any model loads. `specs`: `RewardSpec`s."""
    rewards = []
    for spec in specs:
        if isinstance(spec, str):
            spec = _Named(spec)
        function = resolve_function(spec.name)
        options = dict(spec.options)
        if function is length_penalty:
            options.setdefault("max_tokens", max_completion_length)
        fields, every_field = _needed_fields(spec.name, function, options)
        bound = partial(function, **options) if options else function
        rewards.append(Reward(spec.name, spec.weight, bound, fields, every_field))
    names = [r.name for r in rewards]
    if len(set(names)) < len(names):
        raise RewardError(f"rewards {names} name one reward twice; give it once, with its weight")
    return rewards


@dataclass
class _Named:
    """A reward given by name alone."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


def missing_field(rewards: Sequence[Reward], row: dict[str, Any]) -> str | None:
    """Why a data row cannot be scored (a field some reward reads is missing or empty), or None."""
    for reward in rewards:
        for name in reward.fields:
            if name in PROVIDED_FIELDS:
                continue
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                return f"reward {reward.name} needs field {name!r}, which this row lacks"
    return None


def score(
    rewards: Sequence[Reward], prompts: list[str], completions: list[str], rows: list[dict[str, Any]],
    completion_ids: list[list[int]], where: Callable[[int], str],
) -> list[list[float]]:  # fmt: skip
    """Every reward's score of every completion: (completions, rewards). A reward that raises, returns the
    wrong number of scores, or a score that is not a finite number, stops the run here, naming the reward and
    the row (`where(i)` says which data row completion i came from), before anything trains on it."""
    table = [[0.0] * len(rewards) for _ in completions]
    for k, reward in enumerate(rewards):
        everything = _other_columns(reward, rows) if reward.every_field else []
        columns = {name: [row.get(name) for row in rows] for name in everything + reward.fields}
        if "completion_ids" in reward.fields or reward.every_field:
            columns["completion_ids"] = completion_ids
        try:
            values = list(reward.function(prompts, completions, **columns))
        except Exception as exc:  # noqa: BLE001 - a user's reward: stop with its error, named
            raise RewardError(
                f"reward {reward.name} raised {type(exc).__name__}: {exc} (scoring completions of {where(0)} "
                f"and the rest of this step's rows)"
            ) from exc
        if len(values) != len(completions):
            raise RewardError(
                f"reward {reward.name} returned {len(values)} scores for {len(completions)} completions; "
                "return one number per completion"
            )
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(
                    f"reward {reward.name} returned {value!r} for a completion of {where(i)}: "
                    f"{completions[i][:80]!r}; a reward must be a finite number. Nothing was trained on it"
                )
            table[i][k] = float(value)
    return table


def _other_columns(reward: Reward, rows: list[dict[str, Any]]) -> list[str]:
    """The rows' columns a **kwargs reward gets besides those it names (not the __file__ / __line__ marks)."""
    if not rows:
        return []
    return [name for name in rows[0] if not name.startswith("__") and name not in reward.fields]
