"""Running a model in eval mode for a while (dropout off) and giving it back in the mode it was in, also when
the block raises: evaluation happens in the middle of training. Each module gets its own mode back, so a part
the caller keeps in eval mode inside a training model (a frozen norm's statistics) stays there."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
