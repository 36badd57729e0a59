"""Deterministic batch order, identical across single-process and multi-process runs.

The training stream is the concatenation of seeded per-epoch permutations of the dataset. Optimizer step `s`
consumes `batch_size * grad_accum * world_size` consecutive stream positions; micro-batch `m = a * world + rank`
(accumulation index `a`) takes the m-th slice. So 2 processes with accumulation 1 see exactly the micro-batches
that 1 process with accumulation 2 sees, and a resumed run continues at the recorded position.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..data.formats import IGNORE, Example


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def stream_slice(n: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices at stream positions [start, start + count)."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range(start, start + count)]


def micro_batch_indices(
    n: int,
    seed: int,
    step: int,
    accum_index: int,
    batch_size: int,
    grad_accum: int,
    rank: int,
    world: int,
    lengths: tuple[int, ...] | None = None,
    group_steps: int = 0,
) -> list[int]:
    """Indices for optimizer step `step` (0-based), accumulation slot `accum_index`, on `rank`.

    With `group_steps` > 0 (and `lengths`), the examples of each window of `group_steps` consecutive steps are
    sorted by length and cut into batches, and the windows' steps run in a seeded shuffled order: the same
    examples are consumed, with far less padding. It is a function of the position alone, so resuming and the
    single-process / multi-process equivalence are unaffected."""
    per_step = batch_size * grad_accum * world
    offset = (accum_index * world + rank) * batch_size
    if not group_steps or lengths is None:
        return stream_slice(n, seed, step * per_step + offset, batch_size)
    window, slot = _length_window(n, seed, step // group_steps, group_steps, per_step, lengths)
    start = slot[step % group_steps] * per_step + offset
    return list(window[start : start + batch_size])


@lru_cache(maxsize=2)
def _length_window(
    n: int, seed: int, window: int, group_steps: int, per_step: int, lengths: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    indices = stream_slice(n, seed, window * group_steps * per_step, group_steps * per_step)
    ordered = tuple(sorted(indices, key=lambda i: (lengths[i], i)))
    generator = torch.Generator().manual_seed(seed * 7_919 + window)
    return ordered, tuple(torch.randperm(group_steps, generator=generator).tolist())


def collate(
    examples: list[Example], pad_id: int, classification: bool, left_pad: bool = False
) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        span = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, span] = torch.tensor(example.input_ids)
        mask[row, span] = 1
        if not classification:
            labels[row, span] = torch.tensor(example.labels)
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = torch.tensor([e.labels for e in examples]) if classification else labels
    return batch
