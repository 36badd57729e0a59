"""Model-level adapters: methods that change what the whole model is called with (prompt and prefix tuning).

Such a method still lives in one wrapper (an `InputRewritingLayer`, placed around the input embeddings so that
freezing, activation, save/load and deletion work like for every other method), but its effect comes from a
forward pre-hook on the top-level model: before the model runs, the active wrapper rewrites the keyword
arguments (prepends virtual tokens, extends the attention mask and labels, seeds the KV cache); after it runs,
a callback the wrapper returned trims the outputs back to the caller's sequence length.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import AdapterNameError
from .layer import AdapterLayer

OutputFix = Callable[[Any], Any]

# Model attribute: (pre-hook handle, post-hook handle, [layers], [fixes]).
_HOOKS_ATTR = "_deltatune_input_hooks"


class InputRewritingLayer(AdapterLayer):
    """Wraps the input embedding; passes its calls through unchanged and rewrites the model's inputs instead."""

    global_state_keys = True

    def rewrite_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> OutputFix | None:
        """Change `inputs` (the model's keyword arguments) in place for the active adapter; return a function
        that fixes the model's output, or None."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        return self.base_layer(*args, **kwargs)

    def __getattr__(self, name: str):
        # transformers reads attributes of the input embedding (`weight`, `num_embeddings`, `padding_idx`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def set_active(self, names: Iterable[str]) -> None:
        mine = [n for n in names if n in self.adapter_configs]
        if len(mine) > 1:
            raise AdapterNameError(
                f"virtual-token adapters {mine} cannot be active together (their tokens would compete for the "
                "same positions); activate one of them, optionally alongside adapters of other methods"
            )
        super().set_active(mine)


def install_input_hooks(model: nn.Module, layer: InputRewritingLayer) -> None:
    """Route `model`'s calls through `layer.rewrite_inputs` (idempotent)."""
    state = getattr(model, _HOOKS_ATTR, None)
    if state is None:
        names = _positional_names(model)
        fixes: list[list[OutputFix]] = []
        layers: list[InputRewritingLayer] = []

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            active = [lay for lay in layers if lay.unmerged_active]
            if not active:
                fixes.append([])
                return None
            if len(args) > len(names):
                raise TypeError(f"{type(module).__name__} got {len(args)} positional arguments")
            inputs = dict(zip(names, args, strict=False)) | kwargs
            fixes.append([f for f in (lay.rewrite_inputs(module, inputs) for lay in active) if f is not None])
            return (), inputs

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            for fix in reversed(fixes.pop() if fixes else []):
                output = fix(output)
            return output

        pre = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        post = model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
        state = (pre, post, layers, fixes)
        object.__setattr__(model, _HOOKS_ATTR, state)
    if not any(existing is layer for existing in state[2]):
        state[2].append(layer)


def rewrites_inputs(model: nn.Module) -> bool:
    """Whether a method (virtual tokens) rewrites `model`'s calls, so its outputs may not line up with its inputs
    position by position."""
    return getattr(model, _HOOKS_ATTR, None) is not None


def remove_input_hooks(model: nn.Module) -> None:
    """Remove the hooks from `model` and from any submodule that has them (an encoder-decoder's encoder)."""
    for module in model.modules():
        state = module.__dict__.get(_HOOKS_ATTR)
        if state is not None:
            state[0].remove()
            state[1].remove()
            object.__delattr__(module, _HOOKS_ATTR)


def strip_copied_input_hooks(copied: nn.Module) -> None:
    """Drop the input hooks a `copy.deepcopy` carried over. They close over the original model's layers and
    handles, so they must never run on, or be removed through, the copy."""
    for module in copied.modules():
        state = module.__dict__.pop(_HOOKS_ATTR, None)
        if state is None:
            continue
        registries = (
            module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, module._forward_hooks,
            module._forward_hooks_with_kwargs, module._forward_hooks_always_called,
        )  # fmt: skip
        for handle in state[:2]:
            for registry in registries:
                registry.pop(handle.id, None)


def _positional_names(model: nn.Module) -> list[str]:
    params = inspect.signature(model.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def cached_length(cache: Any) -> int:
    """Tokens already in a transformers KV cache (0 for None or an empty cache)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple-of-tuples


def shift_positions(inputs: dict[str, Any], offset: int, prepend: bool) -> None:
    """Move `position_ids` / `cache_position` past `offset` virtual tokens; with `prepend`, also give the
    virtual tokens positions 0..offset-1 in front (they are in this call's sequence)."""
    for key in ("position_ids", "cache_position"):
        value = inputs.get(key)
        if value is None:
            continue
        shifted = value + offset
        if prepend:
            head = torch.arange(offset, device=value.device, dtype=value.dtype)
            head = head.expand(*value.shape[:-1], offset)
            shifted = torch.cat([head, shifted], dim=-1)
        inputs[key] = shifted


def extend_attention_mask(inputs: dict[str, Any], count: int, key: str = "attention_mask") -> None:
    """Prepend `count` attended positions to a 2-D attention mask (the virtual tokens are always visible);
    `key`: which mask (an encoder-decoder's decoder has its own)."""
    mask = inputs.get(key)
    if mask is None:
        return
    if mask.dim() != 2:
        raise ValueError(
            f"virtual-token adapters need a 2-D (batch, length) attention_mask, got shape {tuple(mask.shape)}"
        )
    ones = torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device)
    inputs[key] = torch.cat([ones, mask], dim=1)
