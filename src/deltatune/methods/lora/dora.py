"""DoRA's weight-norm arithmetic, shared by every LoRA layer kind.

Each layer kind says which axis of its base weight indexes output features (`out_axis`); the norm is taken
over all other axes, so one set of formulas serves Linear (out, in), Conv1D (in, out), Embedding
(num, dim) and ConvNd (out, in, *k).
"""

from __future__ import annotations

import torch


def column_norm(weight: torch.Tensor, out_axis: int) -> torch.Tensor:
    """L2 norm per output feature, shape (out,)."""
    dims = tuple(d for d in range(weight.dim()) if d != out_axis)
    return torch.linalg.vector_norm(weight, dim=dims)


def along(vector: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """View a (n,) vector so it broadcasts along `axis` of an ndim-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def magnitude_scale(magnitude: torch.Tensor, base_weight: torch.Tensor, delta: torch.Tensor, out_axis: int):
    """m / ||W + dW||, with the norm detached from the graph (DoRA section 4.3). Shape (out,)."""
    norm = column_norm(base_weight + delta.detach().to(base_weight.dtype), out_axis).detach()
    return magnitude.reshape(-1) / norm.to(magnitude.dtype)
