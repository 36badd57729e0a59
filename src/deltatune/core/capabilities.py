"""What adapters can be used for beyond their own forward, declared by each method and asked by callers.

The merge path, mixed-adapter batches and hot-swapping ask `capability_refusal(config, Capability.X)` instead
of testing `peft_type == "LORA"`, so a new method gains a capability by declaring it (`AdapterMethod.capabilities`),
and the contract suite checks that what a method declares is what it does.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from .registry import get_method

if TYPE_CHECKING:
    from torch import nn

    from .config import AdapterConfig


class Capability(str, Enum):
    """What an adapter can be used for beyond its own forward. A method declares its capabilities; callers
    ask `capability_refusal` (below) instead of testing method names."""

    MERGE = "be merged into the base weights"  # merge, export_merged
    MIXED_BATCH = "share a mixed-adapter batch"  # runtime.mixed, runtime.decode (continuous batching)
    HOTSWAP = "be hot-swapped in place"  # core.hotswap: a saved adapter copied into a loaded one's tensors
    # task.shared_prefix: rows' common prompt prefix runs once and its KV cache serves every row; a method
    # that puts virtual tokens in front of the input (or the cache) changes what comes first
    SHARE_PREFIX = "share a prompt prefix's KV cache across rows"
    # runtime.compiled: a fixed-length static KV cache whose positions are the prompt's own; a method that puts
    # virtual tokens in front of the input (or the cache) moves every position
    STATIC_CACHE = "decode through a static KV cache (the compiled decode step)"
    # train.setup: activations recomputed in the backward pass instead of stored
    CHECKPOINTED = "train under gradient (activation) checkpointing"


def capability_refusal(config: AdapterConfig, capability: Capability) -> str | None:
    """Why an adapter with `config` cannot `capability` (as its method declares), or None when it can."""
    return get_method(config.peft_type).refusal(capability, config)


def method_refusal(peft_type: str, capability: Capability) -> str | None:
    """Why adapters of method `peft_type` cannot `capability` whatever their config (a config section
    before any adapter exists), or None when the method declares it."""
    method = get_method(peft_type)
    if capability in method.capabilities:
        return None
    return method.lacks.get(capability) or f"{method.peft_type} adapters cannot {capability.value}"


def adapter_refusal(model: nn.Module, name: str, capability: Capability) -> str | None:
    """Why adapter `name` loaded in `model` cannot `capability` (or is not there), or None when it can."""
    from .adapters import adapter_configs

    config = adapter_configs(model).get(name)
    if config is None:
        return f"no adapter named {name!r}; this model has {sorted(adapter_configs(model))}"
    reason = capability_refusal(config, capability)
    return f"adapter {name!r} ({config.peft_type}): {reason}" if reason else None
