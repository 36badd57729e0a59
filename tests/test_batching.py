"""Batch order: deterministic, covers the data, identical between 1 process x accumulation and N processes."""

from __future__ import annotations

import random

import pytest

from deltatune.task.batching import micro_batch_indices


def schedule(n, seed, steps, batch, accum, world, lengths=None, group=0):
    """For each step, the micro-batches in the order a single process with `accum * world` slots sees them."""
    return [
        [
            micro_batch_indices(n, seed, s, a, batch, accum, r, world, lengths, group)
            for a in range(accum)
            for r in range(world)
        ]
        for s in range(steps)
    ]


@pytest.mark.parametrize("group", [0, 4])
def test_two_ranks_see_what_one_process_with_accumulation_sees(group):
    lengths = tuple(random.Random(0).randrange(5, 100) for _ in range(50))
    one = schedule(50, 3, 12, 4, accum=2, world=1, lengths=lengths, group=group)
    two = schedule(50, 3, 12, 4, accum=1, world=2, lengths=lengths, group=group)
    assert one == two


def test_every_example_once_per_epoch_and_epochs_reshuffle():
    steps = schedule(40, 0, 10, 4, 1, 1)
    first_epoch = [i for step in steps for batch in step for i in batch]
    assert sorted(first_epoch) == list(range(40))
    second = [i for step in schedule(40, 0, 20, 4, 1, 1)[10:] for batch in step for i in batch]
    assert sorted(second) == list(range(40)) and second != first_epoch
    assert schedule(40, 1, 10, 4, 1, 1) != steps


def test_length_grouping_consumes_the_same_examples_with_less_padding():
    rng = random.Random(1)
    lengths = tuple(rng.randrange(10, 200) for _ in range(400))
    plain = schedule(400, 0, 16, 8, 1, 1)
    grouped = schedule(400, 0, 16, 8, 1, 1, lengths, group=8)
    assert sorted(i for s in plain for b in s for i in b) == sorted(i for s in grouped for b in s for i in b)

    def padded(steps):
        return sum(max(lengths[i] for i in b) * len(b) for s in steps for b in s)

    assert padded(grouped) < 0.75 * padded(plain)
