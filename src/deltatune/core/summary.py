"""Trainable-parameter report."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .quantized import is_quantized


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int
    trainable_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable: {self.percent:.4f}% || adapter size: {_human(self.trainable_bytes)}"
        )


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count each parameter once (tied weights are shared), trainable ones and their bytes. A quantized weight
    counts as the weights it stands for, not its packed storage elements (4-bit: two per element)."""
    params = list(model.parameters())  # nn.Module deduplicates shared parameters
    trainable = [p for p in params if p.requires_grad]
    logical = {id(m.weight): m.in_features * m.out_features for m in model.modules() if is_quantized(m)}
    return TrainableSummary(
        trainable=sum(p.numel() for p in trainable),
        total=sum(logical.get(id(p), p.numel()) for p in params),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
    )
