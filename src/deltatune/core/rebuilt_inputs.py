"""Inputs an adapter's backward can rebuild from tensors autograd keeps anyway, instead of saving them.

Why: a low-rank adapter's weight gradient, dA = (s g B)^T x, needs the layer's input x in backward; a frozen
layer's backward does not (it needs only W). LoRA on every linear layer of a Llama-shaped model therefore keeps
every block's norm outputs and the MLP's down-projection input alive through the step: on SmolLM2 at 4 x 128
about 160 MiB that the frozen model never holds. Those inputs are cheap functions of tensors the frozen graph
keeps for its own backward:
- a norm's output is `norm(h)`, and the norm's backward keeps h;
- a gated MLP's down input is `act(gate) * up`, and the product's backward keeps both factors.
An adapter kernel asks `rebuild_of(x)` for such a recipe, saves the recipe's tensors (no new memory) and
computes x again in backward, once for all the layers that share it. The rebuilt x is bit-identical: the
same deterministic op on the same tensors.

`keep_rebuildable(model)` installs the forward hooks that make outputs recognisable, present only while the model
trains; `forget_rebuildable(model)` removes them. They do nothing while Dynamo traces.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from .layer import AdapterLayer

_REBUILD_ATTR = "_deltatune_rebuild"  # on a tensor: the Rebuild that reproduces it
_HOOKED_ATTR = "_deltatune_rebuild_hooks_on"  # on the model: whether the per-module hooks are in place
_NORM_NAME_ENDINGS = ("RMSNorm", "LayerNorm")
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


class Recompute:
    """What an adopter keeps in its autograd context: no tensors (those go through save_for_backward, so
    activation checkpointing and offloading see them), only the function and one shared result. The
    recomputation runs once, in the first adopter's backward; the value is dropped after the last read."""

    __slots__ = ("fn", "_readers", "_value")

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._readers = 0
        self._value: torch.Tensor | None = None

    def value(self, saved: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Called once by each adopter's backward with the tensors it saved (unpacked: under activation
        checkpointing they are the recomputed ones)."""
        if self._value is None:
            with torch.no_grad():
                self._value = self.fn(*saved)
        value = self._value
        self._readers -= 1
        if self._readers <= 0:
            self._value = None
        return value


class Rebuild:
    """`fn(*tensors)`, run without grad, reproduces a tensor exactly; it lives on that tensor as an attribute."""

    __slots__ = ("tensors", "version", "recompute")

    def __init__(
        self, tensors: tuple[torch.Tensor, ...], fn: Callable[..., torch.Tensor], version: int
    ) -> None:
        self.tensors = tensors
        self.version = version  # of the tensor it rebuilds: an in-place change since makes the recipe wrong
        self.recompute = Recompute(fn)

    def adopt(self) -> tuple[tuple[torch.Tensor, ...], Recompute]:
        """Called by a consumer's forward: the tensors to save instead of the input, and what to keep."""
        self.recompute._readers += 1
        return self.tensors, self.recompute


def _recording() -> bool:
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def rebuild_of(x: torch.Tensor) -> Rebuild | None:
    """How to rebuild x in backward from tensors that stay saved without it, or None (then save x itself)."""
    if not _recording() or x.grad_fn is None:
        return None
    known = getattr(x, _REBUILD_ATTR, None)
    if known is None:
        known = _gated_product(x)
        if known is not None:
            setattr(x, _REBUILD_ATTR, known)
    return known if known is not None and known.version == x._version else None


# Outputs of the activation and adapter layers inside the module being run (a gated MLP), by grad_fn: a
# product of two of them is recognised from its own grad_fn. Strong references, held only for the duration of
# that module's forward (its hooks open and close the scope), per thread.
_scopes = threading.local()


def _scope_stack() -> list[dict]:
    if not hasattr(_scopes, "stack"):
        _scopes.stack = []
    return _scopes.stack


def _open_scope(module: nn.Module, args: tuple) -> None:
    if not torch.compiler.is_compiling():  # (in any grad mode, so that open and close always pair)
        _scope_stack().append({})


def _close_scope(module: nn.Module, args: tuple, output) -> None:
    stack = _scope_stack()
    if not torch.compiler.is_compiling() and stack:
        stack.pop()


def _remember_output(module: nn.Module, args: tuple, output) -> None:
    """Forward hook: record this output in the open scope, if any, under the node that produced it."""
    stack = _scope_stack()
    if stack and isinstance(output, torch.Tensor) and output.grad_fn is not None and _recording():
        stack[-1][output.grad_fn] = output


def _gated_product(x: torch.Tensor) -> Rebuild | None:
    """x = p * q where p and q are outputs recorded in the open scope, of x's shape and dtype, that require
    grad: then the product's own backward keeps both (it needs each to differentiate by the other)."""
    stack = _scope_stack()
    node = x.grad_fn
    if not stack or type(node).__name__ != "MulBackward0" or len(node.next_functions) != 2:
        return None
    factors = []
    for parent, index in node.next_functions:
        factor = stack[-1].get(parent) if parent is not None else None
        if factor is None or factor.output_nr != index or factor.grad_fn is not parent:
            return None
        if factor.shape != x.shape or factor.dtype != x.dtype or not factor.requires_grad:
            return None
        factors.append(factor)
    return Rebuild(tuple(factors), torch.mul, x._version)


def _tag_norm_output(module: nn.Module, args: tuple, output) -> None:
    """Forward hook on a norm: its output can be rebuilt as module.forward(input), as long as nothing else
    hooks the module (another hook could change the output) and the norm's backward keeps the input."""
    if not _recording() or len(args) != 1 or not isinstance(output, torch.Tensor):
        return
    (source,) = args
    if not isinstance(source, torch.Tensor) or not source.requires_grad or source.shape != output.shape:
        return
    if module._forward_pre_hooks or len(module._forward_hooks) != 1:
        return
    setattr(output, _REBUILD_ATTR, Rebuild((source,), module.forward, output._version))


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(_NORM_NAME_ENDINGS) or isinstance(
        module, (nn.LayerNorm, nn.RMSNorm)
    )


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ in _ACTIVATION_MODULES


def _has_hook(hooks: dict, hook: Callable) -> bool:
    return any(existing is hook for existing in hooks.values())


def keep_rebuildable(model: nn.Module) -> None:
    """Let `model`'s adapter kernels rebuild inputs while it trains. One pre-hook on the model adds the
    per-module hooks before a forward that trains (training mode, grad enabled) and takes them off before one
    that does not, so inference pays one hook call per forward instead of one per norm, activation, adapter
    and MLP (measured ~2% of a single-token forward on SmolLM2). Idempotent."""
    if not _has_hook(model._forward_pre_hooks, _follow_mode):
        model.register_forward_pre_hook(_follow_mode)


def _follow_mode(model: nn.Module, args: tuple) -> None:
    if torch.compiler.is_compiling():
        return
    training = model.training and torch.is_grad_enabled()
    if training != model.__dict__.get(_HOOKED_ATTR, False):
        _remove_module_hooks(model)
        if training:
            _add_module_hooks(model)
        model.__dict__[_HOOKED_ATTR] = training


def _add_module_hooks(model: nn.Module) -> None:
    """Hook every norm; and each module that runs an activation and adapter layers of its own (a gated MLP),
    with those children, so a product of their outputs is recognised."""
    for module in model.modules():
        if _is_norm(module):
            module.register_forward_hook(_tag_norm_output)
        children = list(module.children())
        adapters = [isinstance(child, AdapterLayer) for child in children]
        if not any(map(_is_activation, children)) or not any(adapters):
            continue
        module.register_forward_pre_hook(_open_scope)
        module.register_forward_hook(_close_scope, always_call=True)
        for child, adapter in zip(children, adapters, strict=True):
            if adapter or _is_activation(child):
                child.register_forward_hook(_remember_output)


_MODULE_HOOKS = (_tag_norm_output, _remember_output, _open_scope, _close_scope)


def _remove_module_hooks(model: nn.Module, ours: tuple[Callable, ...] = _MODULE_HOOKS) -> None:
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if any(hook is one for one in ours):
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)


def forget_rebuildable(model: nn.Module) -> None:
    """Remove every hook keep_rebuildable installed (found by identity, so a copied model loses its too)."""
    _remove_module_hooks(model, (_follow_mode, *_MODULE_HOOKS))
    model.__dict__.pop(_HOOKED_ATTR, None)
