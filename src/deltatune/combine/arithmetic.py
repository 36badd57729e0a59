"""Combination rules on one module's deltas ΔW_i, each already multiplied by its adapter's weight w_i.

- linear / svd / cat: Σ w_i ΔW_i (task arithmetic; a negative weight subtracts a task). Low-rank when every
  source is: [w_1 B_1 | w_2 B_2 | ...] @ [A_1; A_2; ...] is exact at rank Σ r_i, which `cat` keeps and the
  others truncate.
- magnitude_prune: keep the `density` share of each w_i ΔW_i's entries with the largest magnitude, then sum.
- ties (Yadav et al. 2023, "TIES-Merging"): trim as above, elect one sign per entry, then average the
  entries that agree with it (zeros and dissenters do not count).
- dare_linear / dare_ties (Yu et al. 2024, "Language Models are Super Mario"): drop each entry with
  probability 1 - density and scale the survivors by 1 / density, then sum, or elect and average as TIES.

Sign election: "total" takes the sign of Σ_i value (mass), "frequency" the sign of Σ_i sign(value) (votes).
Trimming is per module (per weight matrix), as HF PEFT does; the TIES paper trims over the whole task vector.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import CombineError
from .deltas import ModuleDelta
from .options import DENSITY_METHODS, LOW_RANK_METHODS, METHODS, SIGN_RULES


def check_parameters(method: str, weights: list[float], density: float, sign_rule: str) -> None:
    if method not in METHODS:
        raise CombineError(f"unknown combination method {method!r}; choose one of {list(METHODS)}")
    if sign_rule not in SIGN_RULES:
        raise CombineError(f"unknown sign rule {sign_rule!r}; choose one of {list(SIGN_RULES)}")
    if method in DENSITY_METHODS and not 0.0 < density <= 1.0:
        raise CombineError(f"density is the share of entries kept, in (0, 1]; got {density}")
    if not all(math.isfinite(w) for w in weights):
        raise CombineError(f"weights must be finite numbers, got {weights}")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its ceil(density * n) largest-magnitude entries set to zero."""
    keep = math.ceil(density * delta.numel())
    if keep >= delta.numel():
        return delta
    flat = delta.abs().flatten()
    threshold = flat.kthvalue(flat.numel() - keep + 1).values
    kept = delta.abs() >= threshold
    if int(kept.sum()) > keep:  # ties at the threshold: keep the first ones, so exactly `keep` survive
        order = torch.argsort(flat, descending=True, stable=True)[:keep]
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[order] = True
        kept = kept.view_as(delta)
    return delta * kept


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` and divided by it, so the expectation is unchanged."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def elect_sign(deltas: list[torch.Tensor], rule: str) -> torch.Tensor:
    stacked = torch.stack(deltas)
    votes = stacked.sum(dim=0) if rule == "total" else stacked.sign().sum(dim=0)
    return votes.sign()


def disjoint_mean(deltas: list[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the values whose sign is the elected one; zero where none is."""
    stacked = torch.stack(deltas)
    agree = stacked.sign() == sign
    count = agree.sum(dim=0).clamp(min=1)
    return (stacked * agree).sum(dim=0) / count


def combine_module(
    deltas: list[ModuleDelta | None],
    weights: list[float],
    method: str,
    *,
    density: float = 1.0,
    sign_rule: str = "total",
    generator: torch.Generator | None = None,
) -> ModuleDelta:
    """One module's combined ΔW. `deltas[i]` is None where adapter i does not adapt this module (ΔW_i = 0)."""
    present = [(d.scaled(w)) for d, w in zip(deltas, weights, strict=True) if d is not None]
    if method in LOW_RANK_METHODS:
        if all(d.low_rank for d in present):
            return ModuleDelta(b=torch.cat([d.b for d in present], 1), a=torch.cat([d.a for d in present], 0))
        if method == "cat":
            raise CombineError(
                "cat concatenates LoRA factors, and a source here has only a dense delta (DoRA, IA3 or a "
                "bottleneck); use linear (or svd) with a rank or an energy threshold"
            )
        return ModuleDelta(full=sum(d.dense() for d in present))
    # Entries of zero from an absent adapter count as in the paper: they neither vote nor enter a mean.
    dense = [d.dense() for d in present]
    if method in ("dare_linear", "dare_ties"):
        dense = [drop_and_rescale(d, density, generator) for d in dense]
    else:
        dense = [trim(d, density) for d in dense]
    if method in ("ties", "dare_ties"):
        return ModuleDelta(full=disjoint_mean(dense, elect_sign(dense, sign_rule)))
    return ModuleDelta(full=sum(dense))
