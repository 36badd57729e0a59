"""The output head's input made contiguous where `logits_to_keep` has sliced it.

A transformers causal LM given `logits_to_keep=k` runs its head on `hidden[:, -k:, :]`, a strided view of the
last hidden states whenever the batch has more than one row. torch's linear takes a slow path for such a view
(a batched product against the weight, expanded per row, instead of one matrix product): on SmolLM2's
49,152 x 576 head, measured here for 50 rows and k=1, 275 ms against 38 ms for the same rows contiguous in
fp32, and 2.6 s against 11 ms in bf16 (bench/README §29). One copy of the kept rows (k x hidden floats per
row) avoids it, for one row too: its size-1 dimensions keep the prompt's strides, which bf16 products read
slowly. Decode steps (one position per row) are row-major already and pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Within this block, calls of `model`'s output head (transformers' `get_output_embeddings`) get their
    input as a contiguous tensor. A model without one is left as it is."""
    owner = getattr(model, "module", model)  # DDP and FSDP wrappers keep the model in .module
    find = getattr(owner, "get_output_embeddings", None)
    head = find() if callable(find) else None
    if not isinstance(head, nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous_first)
    try:
        yield
    finally:
        handle.remove()


def _contiguous_first(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not has_row_major_strides(args[0]):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def has_row_major_strides(tensor: torch.Tensor) -> bool:
    """Whether every stride is the row-major one for the shape, size-1 dimensions included. `is_contiguous`
    ignores those, and `contiguous()` keeps them as they are: one row sliced from a prompt of n positions is
    "contiguous" with strides (n x hidden, hidden, 1), and torch's bf16 linear still took 54-86 ms on it for
    SmolLM2's head against 3.4 ms with the strides (hidden, hidden, 1)."""
    expected = 1
    for size, stride in zip(reversed(tensor.shape), reversed(tensor.stride()), strict=True):
        if stride != expected:
            return False
        expected *= size
    return True
