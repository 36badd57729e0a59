"""The KV-cache argument of a transformers model, under whichever name the installed version gives it.

transformers 5.24 renamed the forward's `past_key_values` argument (and the output field) to `cache`; the old
name still works with a warning until 5.40, but `generate` now passes `cache=`. Code that reads or seeds the
cache of someone else's call (prefix and prompt tuning rewrite the model's keyword arguments) must look under
both names, or it silently misses the cache `generate` handed over and re-seeds it on every step. Code that
calls the model itself uses the name its forward declares, so it runs without warnings on every version.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

# Newest first: the name transformers >= 5.24 uses, then the name of earlier releases.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str:
    """The name `model.forward` takes its KV cache by (`cache` on transformers >= 5.24). A head whose forward
    passes **kwargs on (BertForSequenceClassification) answers for its backbone (`model.base_model`)."""
    for module in (model, getattr(model, "base_model", None)):
        params = inspect.signature(module.forward).parameters if module is not None else {}
        for name in CACHE_ARGUMENTS:
            if name in params:
                return name
    return CACHE_ARGUMENTS[-1]  # the name every version still accepts


def takes_cache(model: nn.Module) -> bool:
    """Whether `model.forward` declares a KV-cache argument (or forwards **kwargs, which may carry one)."""
    params = inspect.signature(model.forward).parameters.values()
    return any(p.name in CACHE_ARGUMENTS or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def cache_in(inputs: dict[str, Any]) -> Any:
    """The KV cache in a forward call's keyword arguments, under either name (None if there is none)."""
    for name in CACHE_ARGUMENTS:
        if inputs.get(name) is not None:
            return inputs[name]
    return None


def put_cache(model: nn.Module, inputs: dict[str, Any], cache: Any) -> None:
    """Set the KV cache of a forward call's keyword arguments under the name the call already uses (else the
    one the model declares), and drop the other name: given both, transformers keeps `cache` and ignores
    `past_key_values`."""
    used = [name for name in CACHE_ARGUMENTS if inputs.get(name) is not None]
    name = used[0] if used else cache_argument(model)
    for other in CACHE_ARGUMENTS:
        inputs.pop(other, None)
    inputs[name] = cache


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (`output.cache` on transformers >= 5.24, `past_key_values` before)."""
    for name in CACHE_ARGUMENTS:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def new_dynamic_cache(config: Any) -> Any:
    """An empty `DynamicCache` for a model with this (text) config."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


# Models whose forward takes no position_ids: each row's positions come from its attention mask (ALiBi), so
# left-padded rows need nothing more.
POSITIONS_FROM_MASK = frozenset({"bloom"})


def takes_positions(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def positions_from_mask(model: nn.Module) -> bool:
    """Whether `model` reads each row's positions from its attention mask rather than from position_ids."""
    config = getattr(model, "config", None)
    return not takes_positions(model) and getattr(config, "model_type", None) in POSITIONS_FROM_MASK


def position_argument(model: nn.Module, positions: Any) -> dict[str, Any]:
    """`{"position_ids": positions}` for a model that takes them; nothing for one that reads them from its
    attention mask."""
    return {"position_ids": positions} if takes_positions(model) else {}


def full_dynamic_cache() -> Any:
    """An empty `DynamicCache` whose every layer keeps all its tokens. The decode engine merges and pads rows'
    caches column by column, which a sliding-window layer (it drops the oldest columns as it goes) does not
    allow; with full layers, the model still limits a sliding-window layer to its window through the attention
    mask it builds per layer type (Mistral, Gemma 2/3), so the outputs are those of the windowed cache."""
    from transformers import DynamicCache

    return DynamicCache()
