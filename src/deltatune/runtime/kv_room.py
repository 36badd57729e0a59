"""A KV-cache layer with room to grow, for the decode batch.

transformers' `DynamicLayer` concatenates every step's new keys and values onto the whole cache, a copy of all
of it per token: at 50 rows of ~90 cached tokens on SmolLM2 that was 36 of a decode step's 180 ms. A
`RoomyLayer` keeps its keys and values in buffers longer than what they hold and writes each step's column in
place; only when the room runs out is the cache copied into larger buffers (half as long again), so the copies
per token fall from one to a few over a whole generation. `keys` and `values` are views of what is held, so
code that reads them (attention, masks) or writes rows in place sees an ordinary layer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 32  # columns added at the least when a buffer grows


class RoomyLayer(DynamicLayer):
    """A `DynamicLayer` whose buffers (rows, heads, capacity, head_dim) hold `length` columns in front."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """`dtype`: the buffers' (default: the keys'); each update's keys and values are cast into it."""
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self.dtype = dtype or keys.dtype
        self.hold(keys, values)

    # transformers reads and assigns `keys` / `values` (selecting rows, cropping): an assignment holds the new
    # tensors as they are, with no room, and the next update makes room again
    @property
    def keys(self) -> torch.Tensor | None:
        held = getattr(self, "_keys", None)
        return None if held is None else held[:, :, : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value
        self.length = 0 if value is None or value.dim() < 3 else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        held = getattr(self, "_values", None)
        return None if held is None else held[:, :, : self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value

    def hold(self, keys: torch.Tensor, values: torch.Tensor, room: int | None = None) -> None:
        """Hold `keys`/`values` (rows, heads, columns, head_dim) copied into buffers with `room` more columns
        (default: half as many again, at least MIN_ROOM)."""
        length = keys.shape[-2]
        room = max(MIN_ROOM, length // 2) if room is None else room
        self._keys = _with_room(keys, room, self.dtype)
        self._values = _with_room(values, room, self.dtype)
        self.length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.length + new > self._keys.shape[-2]:
            self.hold(self.keys, self.values, room=max(MIN_ROOM, (self.length + new) // 2) + new)
        end = self.length + new
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys, self.values

    def keep(self, rows: int, start: int) -> None:
        """Keep the first `rows` rows and the columns from `start` on, as views of the same buffers: the room
        after them stays."""
        self._keys = self._keys[:rows, :, start:]
        self._values = self._values[:rows, :, start:]
        self.length -= start


def with_room(cache: DynamicCache, dtype: torch.dtype | None = None) -> DynamicCache:
    """`cache` with each plain layer replaced by a `RoomyLayer` holding the same keys and values (in `dtype`,
    default their own)."""
    cache.layers = [
        layer if isinstance(layer, RoomyLayer) else RoomyLayer(layer.keys, layer.values, dtype)
        for layer in cache.layers
    ]
    return cache


def _with_room(held: torch.Tensor, room: int, dtype: torch.dtype) -> torch.Tensor:
    rows, heads, length, dim = held.shape
    buffer = held.new_empty(rows, heads, length + room, dim, dtype=dtype)
    buffer[:, :, :length] = held
    return buffer
