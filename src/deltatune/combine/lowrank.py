"""A delta as LoRA factors of a chosen rank: truncated SVD, with the error it leaves.

For a low-rank delta B A (rank R, out x in) the SVD comes from two thin QRs and an R x R SVD, never the full
matrix: B = Q_b R_b, A^T = Q_a R_a, so B A = Q_b (R_b R_a^T) Q_a^T. Singular values are split evenly between
the factors (B = U sqrt(S), A = sqrt(S) V^T), which keeps both well scaled for further training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import CombineError
from .deltas import ModuleDelta


@dataclass
class Factors:
    b: torch.Tensor  # (out, rank)
    a: torch.Tensor  # (rank, in)
    relative_error: float  # ||ΔW - B A||_F / ||ΔW||_F (0 for an all-zero ΔW)
    energy_kept: float  # share of Σσ² the kept singular values carry

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def _svd(delta: ModuleDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not delta.low_rank:
        return torch.linalg.svd(delta.full.double(), full_matrices=False)
    q_b, r_b = torch.linalg.qr(delta.b.double())
    q_a, r_a = torch.linalg.qr(delta.a.double().t())
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())
    return q_b @ u, s, vh @ q_a.t()


def choose_rank(singular: torch.Tensor, rank: int | None, energy: float | None, most: int) -> int:
    """`rank` (at most `most`, the smaller side of the matrix), or the fewest singular values that carry
    `energy` of Σσ². A rank above the delta's own is kept, padded with zero factors, so that every module
    of a converted adapter can have the same rank."""
    if energy is not None:
        total = float((singular**2).sum())
        if total == 0.0:
            return 1
        share = torch.cumsum(singular**2, 0) / total
        return min(int((share < energy - 1e-12).sum()) + 1, singular.numel())
    return max(1, min(rank, most))


def truncate(delta: ModuleDelta, rank: int | None = None, energy: float | None = None) -> Factors:
    """Factors of `delta` at `rank`, or at the smallest rank keeping `energy` (0 < energy <= 1) of its
    squared Frobenius norm. Exactly one of the two is given."""
    if (rank is None) == (energy is None):
        raise CombineError("give either a rank or an energy threshold, not both and not neither")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise CombineError(f"energy is a share of the squared singular values, in (0, 1]; got {energy}")
    if rank is not None and rank < 1:
        raise CombineError(f"rank must be at least 1, got {rank}")
    u, s, vh = _svd(delta)
    k = choose_rank(s, rank, energy, min(delta.shape))
    root = s[:k].sqrt()
    total, kept = float((s**2).sum()), float((s[:k] ** 2).sum())
    out_dim, in_dim = delta.shape
    b, a = u[:, :k] * root[None, :], root[:, None] * vh[:k]
    if b.shape[1] < k:  # the delta's rank is below the one asked: the rest is exactly zero
        b = torch.cat([b, torch.zeros(out_dim, k - b.shape[1], dtype=b.dtype)], 1)
        a = torch.cat([a, torch.zeros(k - a.shape[0], in_dim, dtype=a.dtype)], 0)
    return Factors(
        b=b.float(),
        a=a.float(),
        relative_error=(max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0,
        energy_kept=kept / total if total > 0 else 1.0,
    )


def exact(delta: ModuleDelta) -> Factors:
    """A low-rank delta's own factors, untouched (cat: rank Σ r_i, no error)."""
    return Factors(b=delta.b, a=delta.a, relative_error=0.0, energy_kept=1.0)
