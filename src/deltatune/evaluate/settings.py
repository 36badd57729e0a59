"""What `deltatune bench` measures, checked before anything loads (no torch here: the CLI parses with it)."""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("base", "unmerged", "merged", "quantized")


@dataclass
class LatencySettings:
    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_tokens: int = 64
    new_tokens: int = 16
    reps: int = 5
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if "base" not in self.variants:
            raise ValueError("the variants must include 'base': every ratio is to it")
        for name in ("prompt_tokens", "reps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be at least 2: time per token is measured after the first")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch sizes must be at least 1")
