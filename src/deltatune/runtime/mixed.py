"""Mixed-adapter batches: one forward in which every row of the batch uses its own LoRA adapter (or none).

Each targeted linear layer gets, for the duration of the batch, two row-ordered stacks of its adapters'
factors, padded with zeros to the largest rank among them and with the LoRA scale folded into B:
  A_rows: (batch, in, r_max)   B_rows: (batch, r_max, out)
and its output becomes  y = base(x) + bmm(bmm(x, A_rows), B_rows),  two batched GEMMs over the whole batch
(the BGMV idea from Punica / S-LoRA), instead of a Python loop that splits the batch per adapter. A row with
no adapter, or whose adapter does not target this layer, has zero factors. Zero padding adds exact zeros, so
each row equals that row run alone with its adapter, up to float summation order.

The stacks are built once per batch (`mixed_adapters` context) and reused by every forward inside it, so a
`generate` call with a KV cache pays for them once, not per new token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..core.errors import AdapterNameError
from ..core.inject import adapter_configs, adapter_layers, disable_adapter
from ..methods.lora.layers import LoraLinear


class MixedBatchError(ValueError):
    """The adapters asked for cannot share one batched forward."""


def mixable_refusal(
    model: nn.Module, name: str, layers: Sequence[tuple[str, nn.Module]] | None = None
) -> str | None:
    """Why adapter `name` cannot take part in a mixed batch, or None when it can."""
    config = adapter_configs(model).get(name)
    if config is None:
        return f"no adapter named {name!r}; this model has {sorted(adapter_configs(model))}"
    if config.peft_type != "LORA":
        return f"adapter {name!r} is {config.peft_type}; mixed batches batch LoRA only"
    if getattr(config, "use_dora", False):
        return f"adapter {name!r} uses DoRA, whose per-row weight norm has no batched form here"
    if config.modules_to_save:
        return f"adapter {name!r} has modules_to_save (a full module copy per adapter)"
    for layer_name, layer in adapter_layers(model) if layers is None else layers:
        if name in layer.adapter_configs and not isinstance(layer, LoraLinear):
            return f"adapter {name!r} wraps {layer_name} ({type(layer).__name__}); mixed batches cover linear layers"
    return None


def _row_stacks(
    layer: LoraLinear, rows: Sequence[str | None], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A_rows (batch, in, r_max) and B_rows (batch, r_max, out) for one layer, or None if no row uses it."""
    present = [n for n in rows if n is not None and n in layer.adapter_configs]
    if not present:
        return None
    r_max = max(layer.factors(n)[0].shape[0] for n in present)
    device = layer.lora_A[present[0]].weight.device
    a_rows = torch.zeros(len(rows), layer.in_features, r_max, dtype=dtype, device=device)
    b_rows = torch.zeros(len(rows), r_max, layer.out_features, dtype=dtype, device=device)
    for i, name in enumerate(rows):
        if name is None or name not in layer.adapter_configs:
            continue
        a, b = layer.factors(name)
        r = a.shape[0]
        a_rows[i, :, :r] = a.detach().t()
        b_rows[i, :r, :] = b.detach().t() * layer.scaling[name]
    return a_rows, b_rows


def _add_rowwise_update(a_rows: torch.Tensor, b_rows: torch.Tensor):
    batch = a_rows.shape[0]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.shape[0] != batch:
            raise MixedBatchError(
                f"a mixed batch was set up for {batch} rows but a forward got {x.shape[0]}; beam search and "
                "num_return_sequences > 1 change the batch size and are not supported with per-row adapters"
            )
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a_rows.dtype), a_rows)
        out = output.reshape(batch, -1, output.shape[-1])
        return torch.baddbmm(out, h.to(out.dtype), b_rows.to(out.dtype)).view(output.shape)

    return hook


@contextmanager
def mixed_adapters(model: nn.Module, rows: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses adapter `rows[i]` (None: the base model).

    For inference (eval mode); the model's active adapters are restored on exit. Every named adapter must be
    plain LoRA on linear layers (`mixable_refusal` says why one is not); batches through the block must have
    exactly len(rows) rows.
    """
    if model.training:
        raise MixedBatchError("mixed-adapter batches are for inference; call model.eval() first")
    layers = list(adapter_layers(model))
    for name in dict.fromkeys(n for n in rows if n is not None):
        reason = mixable_refusal(model, name, layers)
        if reason:
            raise (AdapterNameError if "no adapter named" in reason else MixedBatchError)(reason)
    rows = list(rows)
    handles = []
    with disable_adapter(model), torch.no_grad():
        for _, layer in layers:
            if not isinstance(layer, LoraLinear):
                continue
            dtype = layer.lora_A[next(iter(layer.lora_A))].weight.dtype if len(layer.lora_A) else None
            stacks = _row_stacks(layer, rows, dtype) if dtype is not None else None
            if stacks is not None:
                handles.append(layer.register_forward_hook(_add_rowwise_update(*stacks)))
        try:
            yield model
        finally:
            for handle in handles:
                handle.remove()
