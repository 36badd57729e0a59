"""LoRA on one parameter of a module (PEFT's `target_parameters`): fused MoE experts and bare router weights.

A 3-D parameter holds E experts, each a matrix; every expert gets its own rank-r pair, stored as PEFT stores
them: lora_A (r*E, in) with expert e's rows at [e*r, (e+1)*r), lora_B (out, r*E) with expert e's columns at
e, E + e, 2E + e, ... (PEFT reshapes B to (out, r, E)). The forward calls the module with its parameter replaced
by W + ΔW, so any experts implementation (a Python loop, grouped GEMMs) sees the adapted weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ...core.errors import TargetingError
from .layers import LoraLayer


class LoraParameter(LoraLayer):
    """LoRA on `base_layer`'s parameter `parameter_name` (of the module under any other parameter wrappers,
    one per parameter, as PEFT nests them). Layouts: 2-D (out, in); 3-D (E, out, in), or (E, in, out) where the
    module says `is_transposed`."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        owner, path = base_layer, []
        while isinstance(owner, LoraParameter):
            owner, path = owner.base_layer, [*path, "base_layer"]
        self._path = ".".join([*path, parameter_name])  # the parameter, as seen from base_layer
        self._owner = [owner]  # in a list: not a submodule of this wrapper (it is one of base_layer)
        shape = getattr(owner, parameter_name).shape
        self.transposed = len(shape) == 3 and bool(getattr(owner, "is_transposed", False))
        if len(shape) == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, tuple(shape)
        elif len(shape) == 3:
            experts, first, second = shape
            self.num_experts = experts
            self.in_features, self.out_features = (first, second) if self.transposed else (second, first)
        else:
            raise TargetingError(
                f"{parameter_name} has shape {tuple(shape)}; LoRA adapts a 2-D or 3-D (experts) parameter"
            )

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self._owner[0], self.parameter_name)

    def factor_shapes(self, r: int):
        return (r * self.num_experts, self.in_features), (self.out_features, r * self.num_experts)

    def expert_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's (B_e, A_e) with the scaling folded into B: shapes (E, out, r) and (E, r, in)."""
        a, b = self.factors(name)
        experts = self.num_experts
        a_e = a.reshape(experts, -1, a.shape[-1])
        b_e = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
        return b_e * self.scaling[name], a_e

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B_e A_e for every expert, laid out like the parameter."""
        if self.num_experts == 1 and self.base_weight.dim() == 2:
            a, b = self.factors(name)
            return (b @ a) * self.scaling[name]
        b_e, a_e = self.expert_factors(name)
        delta = torch.bmm(b_e, a_e)  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def forward(self, *args, **kwargs):
        active = self.unmerged_active
        if not active:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight
        effective = weight
        for name in active:
            effective = effective + self.delta_weight(name).to(weight.dtype)
        return functional_call(self.base_layer, {self._path: effective}, args, kwargs)

    def extra_repr(self) -> str:
        experts = f", experts={self.num_experts}" if self.base_weight.dim() == 3 else ""
        return f"parameter={self.parameter_name!r}{experts}, " + super().extra_repr()
