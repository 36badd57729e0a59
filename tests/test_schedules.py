"""The learning-rate schedules equal transformers' `get_scheduler`, step by step, and resume from its state."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from deltatune.train.schedules import SCHEDULES, learning_rate_schedule


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 5])
def test_every_schedule_equals_transformers(name, warmup):
    ours = learning_rate_schedule(name, _optimizer(), warmup, 50)
    theirs = get_scheduler(name, _optimizer(), num_warmup_steps=warmup, num_training_steps=50)
    rates = []
    for _ in range(55):  # a few past the end too, where transformers' values are what they are
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), abs=1e-15)
        rates.append(ours.get_last_lr()[0])
        ours.optimizer.step(), theirs.optimizer.step()
        ours.step(), theirs.step()
    assert min(rates) >= 0.0 and max(rates[:51]) == pytest.approx(2e-3)
    if name in ("linear", "cosine"):
        assert rates[50] == 0.0 and rates[49] > 0.0
    if warmup and name != "constant":  # transformers' "constant" ignores warmup; so does ours
        assert rates[0] == 0.0 and rates[warmup] == pytest.approx(2e-3)


def test_a_schedule_resumes_from_a_state_written_by_transformers():
    theirs = get_scheduler("cosine", _optimizer(), num_warmup_steps=5, num_training_steps=50)
    for _ in range(12):
        theirs.optimizer.step(), theirs.step()
    ours = learning_rate_schedule("cosine", _optimizer(), 5, 50)
    ours.load_state_dict(theirs.state_dict())
    ours.optimizer.step(), theirs.optimizer.step()
    ours.step(), theirs.step()
    assert ours.last_epoch == 13 and ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), abs=1e-15)


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosne'.*cosine"):
        learning_rate_schedule("cosne", _optimizer(), 0, 10)
