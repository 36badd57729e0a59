"""Learning-rate schedules: warmup, then constant, linear or cosine decay, as multipliers of the base rate.

The formulas are those of transformers' `get_scheduler` (tested equal, step by step). They live here because
importing `transformers.optimization` pulls in `transformers.trainer_utils`, which imports PEFT, bitsandbytes
and torch's inductor when they are installed: 1.1 s added to the start of every `deltatune train` process
(each sweep trial, each torchrun rank) for four lines of arithmetic."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def _multiplier(step: int, *, name: str, warmup: int, total: int) -> float:
    if name == "constant":  # as in transformers: "constant" has no warmup
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine: half a period, to 0 at `total`


def learning_rate_schedule(
    name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A `LambdaLR` stepping `name` over `total_steps` optimizer steps, the first `warmup_steps` a linear
    ramp from 0. Its `state_dict` is the same as that of the scheduler transformers would build."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    rule = functools.partial(_multiplier, name=name, warmup=warmup_steps, total=total_steps)
    return LambdaLR(optimizer, rule)
