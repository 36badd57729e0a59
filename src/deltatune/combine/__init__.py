"""Adapter arithmetic and conversion on exact weight deltas: combine several adapters (linear, cat, svd,
ties, dare_linear, dare_ties, magnitude_prune) or rewrite one as a plain LoRA any engine loads."""

from .api import CombineReport, combine_adapters, convert_adapter

__all__ = ["CombineReport", "combine_adapters", "convert_adapter"]
