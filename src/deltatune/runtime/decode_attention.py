"""Decode steps of a half-precision model on a CPU attend in float32, over a float32 KV cache.

torch 2.13's CPU attention kernel for bf16 is built for long queries: at one query per row, a decode step, it
spends its time preparing the keys and values, and runs 4-6x slower than the same attention in float32 (16
rows of SmolLM2 over 40 / 100 / 300 cached tokens: 505 / 983 / 2,596 us a layer in bf16 against 118 / 204 /
405 us in float32; bench/README §32). Casting the cached keys and values up at every step costs more than it
saves, since each cast is a fresh multi-megabyte allocation. So the decode batch keeps its cache in float32
(the bf16 keys and values each step adds are exact in it) and its steps run `float32_attention`, which lifts
the one-token queries to float32 and rounds the output back. That is also the more exact attention: bf16's
kernel rounds its probabilities to bf16 before weighting the values; here only the output is rounded.

The prompt pass keeps the model's own attention and cache dtype: many queries per row is what the bf16 kernel
is fast at. The price is the decode cache's memory: twice the bf16 cache, what a float32 model holds. The
compiled single-row step (`runtime.compiled`) keeps its static cache in float32 the same way
(`Float32StaticLayer`): its prompt and its steps attend in float32, one row over 256 cached columns taking 37
against 223 us a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FLOAT32_ATTENTION = "deltatune_float32_kv"  # the name the attention and its (sdpa) mask are registered under


def float32_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' sdpa attention, with queries lifted to the keys' dtype (float32 in a decode step of a
    half-precision model) and the output rounded back to the queries'."""
    if key.dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    output, weights = sdpa_attention_forward(
        module, query.to(key.dtype), key, value, attention_mask, **kwargs
    )
    return output.to(query.dtype), weights


AttentionInterface.register(FLOAT32_ATTENTION, float32_attention)
AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)


def decode_kv_dtype(model: nn.Module) -> torch.dtype | None:
    """float32 where the decode batch should keep its cache in float32 (a bf16 or fp16 model on a CPU with
    transformers' sdpa attention in its config and every sub-config, reached through transformers' attention
    interface), else None: the cache keeps the model's own dtype. (A model that branches on "sdpa" in its own
    code, such as Falcon, lacks `_supports_attention_backend` and is left as it is.)"""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    if not getattr(type(model), "_supports_attention_backend", False):
        return None
    configs = _configs(getattr(model, "config", None))
    if not configs or any(c._attn_implementation_internal != "sdpa" for c in configs):
        return None
    return torch.float32


@contextmanager
def attending_in_float32(model: nn.Module) -> Iterator[None]:
    """The model's forwards inside the block use `float32_attention`: its config's and sub-configs' attention
    implementation is switched for the block and put back after, on error too."""
    configs = _configs(model.config)
    before = [c._attn_implementation_internal for c in configs]
    for config in configs:  # (the internal attribute: the public setter would reset the sub-configs too)
        config._attn_implementation_internal = FLOAT32_ATTENTION
    try:
        yield
    finally:
        for config, implementation in zip(configs, before, strict=True):
            config._attn_implementation_internal = implementation


def _configs(config) -> list:
    """`config` and its sub-configs at any depth (a composite model's text and vision parts)."""
    if config is None or not hasattr(config, "_attn_implementation_internal"):
        return []
    found = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        found += _configs(getattr(config, key, None))
    return found


class Float32StaticLayer(StaticLayer):
    """A transformers `StaticLayer` whose fixed buffers are float32: the half-precision keys and values each
    update writes are cast into them (exactly)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states.float(), value_states.float())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(key_states.float(), value_states.float(), *args, **kwargs)


def with_float32_layers(cache) -> bool:
    """Give a transformers `StaticCache` float32 layers in place of its plain static ones, before its first
    use. False, and `cache` unchanged, where any layer is of another kind (a sliding window, ...)."""
    if any(type(layer) is not StaticLayer or layer.is_initialized for layer in cache.layers):
        return False
    cache.layers = [Float32StaticLayer(max_cache_len=layer.max_cache_len) for layer in cache.layers]
    return True
