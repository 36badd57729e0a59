"""Mixed-adapter batches: one forward in which every row of the batch uses its own LoRA adapter (or none).

Each targeted linear layer gets, for the duration of the batch, two row-ordered stacks of its adapters'
factors, padded with zeros to the largest rank among them, B scaled by each row's LoRA scale s:
  A_rows^T: (batch, in, r_max)   (s B)_rows^T: (batch, r_max, out)
and its output becomes  y = base(x) + bmm(bmm(x, A_rows^T), (s B)_rows^T),  two batched GEMMs over the batch
(the BGMV idea from Punica / S-LoRA), instead of a Python loop that splits the batch per adapter. A row with
no adapter, or whose adapter does not target this layer, has zero factors. Zero padding adds exact zeros, so
each row equals that row run alone with its adapter, up to float rounding.

The stacks are built once per batch (`mixed_adapters` context) and reused by every forward inside it, so a
`generate` call with a KV cache pays for them once, not per new token. They are written into buffers kept per
layer between batches, since allocating them afresh cost more in page faults than the LoRA math itself.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import activated, adapter_configs, adapter_layers, disable_adapter
from ..core.capabilities import Capability, adapter_refusal
from ..core.errors import AdapterNameError
from ..methods.lora.layers import LoraLinear


class MixedBatchError(ValueError):
    """The adapters asked for cannot share one batched forward."""


def mixable_refusal(
    model: nn.Module, name: str, layers: Sequence[tuple[str, nn.Module]] | None = None
) -> str | None:
    """Why adapter `name` cannot take part in a mixed batch, or None when it can."""
    reason = adapter_refusal(model, name, Capability.MIXED_BATCH)
    if reason:
        return reason
    for layer_name, layer in adapter_layers(model) if layers is None else layers:
        if name not in layer.adapter_configs:
            continue
        if not isinstance(layer, LoraLinear):
            return f"adapter {name!r} wraps {layer_name} ({type(layer).__name__}); mixed batches cover linear layers"
        if (
            layer.weight_path
        ):  # a subclass with its own forward: the update on the raw input may not be its own
            return f"adapter {name!r} wraps {layer_name}, a {type(layer.base_layer).__name__} with its own forward"
    return None


def _pad_rank(factor: torch.Tensor, r_max: int, axis: int) -> torch.Tensor:
    missing = r_max - factor.shape[axis]
    if not missing:
        return factor
    return F.pad(factor, (0, 0, 0, missing) if axis == 0 else (0, missing))


class StackWorkspace:
    """Per-layer stack buffers kept between mixed batches of one model.

    Fresh stacks for every batch (627 MB for 32 rows of r=16 all-linear adapters on SmolLM2) cost more in page
    faults than the batch's LoRA math; a buffer grows to the largest batch seen and is then reused."""

    def __init__(self) -> None:
        self.buffers: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()
        self.in_use = False

    def buffer(self, layer: nn.Module, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        held = self.buffers.get(layer)
        if held is None or held.numel() < numel or held.dtype != dtype or held.device != device:
            self.buffers.pop(layer, None)  # let the old one go before the larger one is allocated
            held = self.buffers[layer] = torch.empty(numel, dtype=dtype, device=device)
        return held

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


_WORKSPACES: weakref.WeakKeyDictionary[nn.Module, StackWorkspace] = weakref.WeakKeyDictionary()


def release_workspace(model: nn.Module) -> int:
    """Free the stack buffers `mixed_adapters` keeps for `model`; returns the bytes released."""
    workspace = _WORKSPACES.pop(model, None)
    return 0 if workspace is None else workspace.nbytes()


class _LayerStacks:
    """One layer's factors in row order, in buffers with room for `capacity` rows:
      a: (capacity, r_max, in)   A per row, zero-padded to the largest rank among the rows' adapters
      b: (capacity, out, r_max)  s B per row, s its adapter's LoRA scale (scaled once, not per forward)
    a zero block for rows whose adapter does not target this layer. Stacked as stored, (r, in) and (out, r): a
    plain copy, several times faster than a transposing one; the GEMMs take transposed views at the same speed.
    Rows can be written one at a time (`write`, `move`), so rows joining or leaving a running batch cost a
    copy of their own factors only."""

    def __init__(
        self, layer: LoraLinear, rows: Sequence[str | None], capacity: int, workspace: StackWorkspace | None
    ) -> None:
        self.layer = layer
        distinct = list(dict.fromkeys(n for n in rows if n is not None and n in layer.adapter_configs))
        factors = {n: layer.factors(n) for n in distinct}
        self.r_max = max(a.shape[0] for a, _ in factors.values())
        a_any, b_any = next(iter(factors.values()))
        dtype, device = _stack_dtype(layer, a_any), a_any.device
        in_features, out_features = a_any.shape[1], b_any.shape[0]
        a_shape, b_shape = (capacity, self.r_max, in_features), (capacity, out_features, self.r_max)
        a_numel, b_numel = math.prod(a_shape), math.prod(b_shape)
        if workspace is not None:
            buffer = workspace.buffer(layer, a_numel + b_numel, dtype, device)
        else:
            buffer = torch.empty(a_numel + b_numel, dtype=dtype, device=device)
        self.a = buffer[:a_numel].view(a_shape)
        self.b = buffer[a_numel : a_numel + b_numel].view(b_shape)
        # All rows at once: each distinct adapter padded once, then one stacking copy per factor.
        a_padded = {n: _pad_rank(a.detach(), self.r_max, 0).to(dtype) for n, (a, _) in factors.items()}
        b_padded = {n: _pad_rank(b.detach(), self.r_max, 1).to(dtype) for n, (_, b) in factors.items()}
        a_zero = torch.zeros(a_shape[1:], dtype=dtype, device=device)
        b_zero = torch.zeros(b_shape[1:], dtype=dtype, device=device)
        batch = len(rows)
        torch.stack([a_padded.get(n, a_zero) for n in rows], out=self.a[:batch])
        torch.stack([b_padded.get(n, b_zero) for n in rows], out=self.b[:batch])
        scale = torch.tensor([layer.scaling[n] if n in factors else 0.0 for n in rows], dtype=dtype)
        self.b[:batch].mul_(scale.to(device).view(-1, 1, 1))

    @staticmethod
    def targets(layer: LoraLinear, rows: Sequence[str | None]) -> bool:
        return any(n is not None and n in layer.adapter_configs for n in rows)

    def fits(self, names: Sequence[str | None]) -> bool:
        """Whether these adapters' factors fit the stacks as laid out (rank at most r_max)."""
        configs = self.layer.adapter_configs
        return all(
            n is None or n not in configs or self.layer.factors(n)[0].shape[0] <= self.r_max for n in names
        )

    def write(self, row: int, name: str | None) -> None:
        if name is None or name not in self.layer.adapter_configs:
            self.a[row].zero_()
            self.b[row].zero_()
            return
        a, b = self.layer.factors(name)
        r = a.shape[0]
        self.a[row, :r].copy_(a.detach())
        self.b[row, :, :r].copy_(b.detach()).mul_(self.layer.scaling[name])
        if r < self.r_max:
            self.a[row, r:].zero_()
            self.b[row, :, r:].zero_()

    def move(self, source: int, target: int) -> None:
        self.a[target].copy_(self.a[source])
        self.b[target].copy_(self.b[source])

    def factors(self, rows: int) -> RowFactors:
        return RowFactors(self.a[:rows].transpose(1, 2), self.b[:rows].transpose(1, 2))


def _stack_dtype(layer: LoraLinear, factor: torch.Tensor) -> torch.dtype:
    """The stacks' dtype: the base weight's where it is a float (bf16 on a bf16 base: the rows' products run
    in the dtype of the input, as a single adapter's do, with no casts per forward), else the adapter's (a
    quantized base, unless it is a packed inference base: its output is in its compute dtype)."""
    if layer.packed_base:
        return layer.base_layer.compute_dtype
    weight = layer.base_weight
    return weight.dtype if weight.is_floating_point() else factor.dtype


class RowFactors(NamedTuple):
    a_t: torch.Tensor  # (batch, in, r_max): A^T per row (a transposed view of stacked A)
    b_t: torch.Tensor  # (batch, r_max, out): s B^T per row, s its LoRA scale (a transposed view of stacked B)


def _rowwise_forward(layer: LoraLinear, factors: RowFactors) -> Callable[..., torch.Tensor]:
    """The layer's forward for one mixed batch: its base output plus row i's update s_i B_i A_i x_i.

    Installed as the instance's `forward` for the batch's duration (`RowUpdates.installed`), so LoraLayer
    itself knows nothing of mixed batches; a forward hook instead would cost ~20 us per call, ~4 ms per
    decode step over SmolLM2's 210 layers."""
    a_t, b_t = factors  # (batch, in, r_max), (batch, r_max, out)
    batch = a_t.shape[0]
    base = layer.base_layer

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = base(x, *args, **kwargs)  # (batch, ..., out)
        if x.shape[0] != batch:
            raise MixedBatchError(
                f"a mixed batch was set up for {batch} rows but a forward got {x.shape[0]}; beam search and "
                "num_return_sequences > 1 change the batch size and are not supported with per-row adapters"
            )
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(a_t.dtype), a_t)  # (batch, tokens, r_max)
        out = output.reshape(batch, -1, output.shape[-1])  # (batch, tokens, out)
        if h.dtype != out.dtype:
            h = h.to(out.dtype)
        factor = b_t if b_t.dtype == out.dtype else b_t.to(out.dtype)
        if torch.is_grad_enabled():
            return torch.baddbmm(out, h, factor).view(output.shape)
        # Inference: add into the base output in place (a fresh tensor): a pass over the output saved.
        return out.baddbmm_(h, factor).view(output.shape)

    return forward


def check_mixable(model: nn.Module, rows: Sequence[str | None]) -> list[tuple[str, nn.Module]]:
    """Refuse rows naming unknown or unmixable adapters; returns the model's adapter layers."""
    known = adapter_configs(model)
    named = list(dict.fromkeys(n for n in rows if n is not None))
    unknown = [n for n in named if n not in known]
    if unknown:
        raise AdapterNameError(f"no adapter named {unknown[0]!r}; this model has {sorted(known)}")
    layers = list(adapter_layers(model))
    for name in named:
        reason = mixable_refusal(model, name, layers)
        if reason:
            raise MixedBatchError(reason)
    return layers


class RowUpdates:
    """Every LoRA layer's per-row updates for one row order: built once, then installed around each forward
    that uses them (`installed`), so a decode loop pays for the stacks when its rows change, not per step.
    Rows joining (`append`) or leaving (`remove`, the last row taking the gap) copy only their own factors;
    a full rebuild happens only when the stacks run out of room or a joining adapter has a larger rank.
    Build with `check_mixable` passed; `workspace` keeps the stacks' memory between builds (a decode loop
    has its own, since its stacks outlive any one `mixed_adapters` block)."""

    def __init__(
        self,
        model: nn.Module,
        rows: Sequence[str | None],
        layers: Sequence[tuple[str, nn.Module]],
        workspace: StackWorkspace | None,
        capacity: int = 0,
    ) -> None:
        self.model = model
        self.rows = list(rows)
        self.capacity = max(capacity, len(self.rows))
        self.workspace = workspace
        self.stacks: list[tuple[LoraLinear, _LayerStacks | None]] = []
        with torch.no_grad():
            for _, layer in layers:
                if isinstance(layer, LoraLinear):
                    self.stacks.append((layer, self._build(layer)))

    def _build(self, layer: LoraLinear) -> _LayerStacks | None:
        if not _LayerStacks.targets(layer, self.rows):
            return None
        return _LayerStacks(layer, self.rows, self.capacity, self.workspace)

    @torch.no_grad()
    def append(self, names: Sequence[str | None], layers: Sequence[tuple[str, nn.Module]]) -> None:
        """Rows joining at the end; `layers` is what `check_mixable` returned for them (loading an adapter
        may have wrapped layers that no adapter targeted before)."""
        start = len(self.rows)
        self.rows += names
        known = {id(layer) for layer, _ in self.stacks}
        self.stacks += [
            (layer, None) for _, layer in layers if isinstance(layer, LoraLinear) and id(layer) not in known
        ]
        if len(self.rows) > self.capacity:  # out of room: everything anew, with room to spare
            self.capacity = max(len(self.rows), 2 * self.capacity)
            self.stacks = [(layer, self._build(layer)) for layer, _ in self.stacks]
            return
        for i, (layer, stacks) in enumerate(self.stacks):
            if stacks is None or not stacks.fits(names):
                if stacks is not None or _LayerStacks.targets(layer, names):
                    self.stacks[i] = (layer, self._build(layer))
                continue
            for row, name in enumerate(names, start):
                stacks.write(row, name)

    @torch.no_grad()
    def remove(self, row: int) -> None:
        """Row `row` leaves; the last row moves into its place (as the caller's batch must do too)."""
        last = len(self.rows) - 1
        if row != last:
            for _, stacks in self.stacks:
                if stacks is not None:
                    stacks.move(last, row)
            self.rows[row] = self.rows[last]
        self.rows.pop()

    @contextmanager
    def installed(self, wrappers: Sequence[nn.Module] | None = None) -> Iterator[nn.Module]:
        """Inside the block each row gets its update and no adapter is otherwise active; a block nested in
        another hands the outer one's updates back on exit. `wrappers` (the model's `all_wrappers`, no adapter
        merged) spares walking the model to disable them, for a decode loop that installs every step."""
        count = len(self.rows)
        replaced = []
        with disable_adapter(self.model) if wrappers is None else activated(wrappers, None):
            try:
                for layer, stacks in self.stacks:
                    replaced.append((layer, vars(layer).pop("forward", None)))  # an outer block's
                    if stacks is not None:  # else the class forward: adapters disabled, the base output
                        layer.forward = _rowwise_forward(layer, stacks.factors(count))
                yield self.model
            finally:
                for layer, previous in replaced:
                    vars(layer).pop("forward", None)
                    if previous is not None:
                        layer.forward = previous


@contextmanager
def mixed_adapters(
    model: nn.Module, rows: Sequence[str | None], keep_workspace: bool = True
) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses adapter `rows[i]` (None: the base model).

    For inference (eval mode); the model's active adapters are restored on exit. Every named adapter must be
    plain LoRA on linear layers (`mixable_refusal` says why one is not); batches through the block must have
    exactly len(rows) rows. With `keep_workspace` the per-row factor stacks are built in buffers kept for the
    model between blocks (about the size of len(rows) adapters; `release_workspace` frees them).
    """
    if model.training:
        raise MixedBatchError("mixed-adapter batches are for inference; call model.eval() first")
    layers = check_mixable(model, rows)
    workspace = _WORKSPACES.setdefault(model, StackWorkspace()) if keep_workspace else None
    if workspace is not None and workspace.in_use:  # a nested block: the outer block's stacks live there
        workspace = None
    try:
        if workspace is not None:
            workspace.in_use = True
        with torch.no_grad(), RowUpdates(model, list(rows), layers, workspace).installed():
            yield model
    finally:
        if workspace is not None:
            workspace.in_use = False
