"""The decode batch's KV layer with room to grow: the same keys and values as transformers' DynamicLayer after
any sequence of updates and cuts, written in place (no copy of the cache per token) until the room runs out."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from deltatune.runtime.kv_room import MIN_ROOM, RoomyLayer


def _columns(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)


def test_updates_equal_a_dynamic_layer_and_copy_only_when_the_room_runs_out():
    plain, roomy = DynamicLayer(), RoomyLayer(*_columns(3, 5, 0))
    plain.update(*_columns(3, 5, 0))
    buffers = {roomy._keys.data_ptr()}
    for step in range(100):
        new = _columns(3, 1, step + 1)
        want, got = plain.update(*new), roomy.update(*new)
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b)
        buffers.add(roomy._keys.data_ptr())
        assert roomy.get_seq_length() == plain.get_seq_length() == 6 + step
    # 105 columns from 5: room for 32, then half as much again each time
    assert len(buffers) <= 4 and roomy._keys.shape[-2] >= 105


def test_rows_moved_and_columns_cut_in_place_keep_the_room():
    roomy = RoomyLayer(*_columns(4, 6, 0))
    plain = DynamicLayer()
    plain.update(*_columns(4, 6, 0))
    for layer in (roomy, plain):
        layer.keys[1] = layer.keys[3]  # the last row moves into a gap, as DecodeBatch._drop does
        layer.values[1] = layer.values[3]
    roomy.keep(3, 2)
    plain.keys, plain.values = plain.keys[:3, :, 2:], plain.values[:3, :, 2:]
    pointer = roomy._keys.data_ptr()
    new = _columns(3, 1, 9)
    for a, b in zip(plain.update(*new), roomy.update(*new), strict=True):
        assert torch.equal(a, b)
    assert roomy._keys.data_ptr() == pointer and roomy._keys.shape[-2] == 6 - 2 + MIN_ROOM


def test_an_assignment_is_held_as_given():
    """transformers' own row selection assigns `keys` and `values`; the next update makes room again."""
    roomy = RoomyLayer(*_columns(2, 3, 0))
    roomy.batch_select_indices(torch.tensor([1]))
    assert roomy.keys.shape == (1, 2, 3, 4) and roomy.get_seq_length() == 3
    keys, _ = roomy.update(*_columns(1, 1, 5))
    assert keys.shape == (1, 2, 4, 4) and roomy._keys.shape[-2] > 4
