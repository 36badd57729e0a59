"""Adapter arithmetic and conversion on exact weight deltas: combine several adapters (linear, cat, svd,
ties, dare_linear, dare_ties, magnitude_prune) or rewrite one as a plain LoRA any engine loads.

Names are imported on first use, so the CLI can read `combine.options` without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CombineReport", "combine_adapters", "convert_adapter"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
