"""(IA)^3: learned rescaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning"). Registered as peft_type "IA3".

For a wrapped linear layer y = W x + b with W of shape (out_features, in_features):
- attention-style modules (keys, values): y' = l * (W x + b), l of shape (out_features,);
- feed-forward modules (`feedforward_modules`): y' = W (l * x) + b, l of shape (in_features,).
Vectors start at 1 (identity). Both forms are linear in the weight, so they merge exactly:
W' = diag(l) W, b' = l * b, or W' = W diag(l). Several active adapters multiply. On disk the vector is PEFT's
`ia3_l`, shaped (out_features, 1) or (1, in_features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.capabilities import Capability
from ..core.config import AdapterConfig
from ..core.errors import AdapterConfigError, MergeError, TargetingError
from ..core.layer import AdapterLayer
from ..core.method import AdapterMethod
from ..core.registry import register
from ..core.targeting import is_hf_conv1d, name_matches


@dataclass
class Ia3Config(AdapterConfig):
    required_keys: ClassVar[tuple[str, ...]] = ("target_modules",)

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # accepted for PEFT files; Conv1D layers are detected from their type
    init_ia3_weights: bool = True  # False: random vectors, only useful for tests

    def validate(self) -> None:
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, (set, tuple)):
            self.feedforward_modules = ff = sorted(ff)
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise AdapterConfigError(
                f"feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules; every "
                "feed-forward module must also be a target"
            )


class Ia3Linear(AdapterLayer):
    """Wraps nn.Linear (weight (out, in)) or transformers Conv1D (weight (in, out))."""

    adapter_attributes = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        # Axis of the weight that the vector scales: output rows, or input columns for feed-forward.
        self.out_axis = 1 if fan_in_fan_out else 0
        out_features, in_features = self.base_weight.shape[::-1] if fan_in_fan_out else self.base_weight.shape
        self.features = {"out": int(out_features), "in": int(in_features)}

    def create_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        assert isinstance(config, Ia3Config)
        ff = config.feedforward_modules is not None and name_matches(module_name, config.feedforward_modules)
        shape = (1, self.features["in"]) if ff else (self.features["out"], 1)
        init = (
            torch.ones(shape) if config.init_ia3_weights else 0.25 + 2 * torch.rand(shape)
        )  # in [0.25, 2.25)
        self.ia3_l[name] = nn.Parameter(init.to(self.base_weight.device))
        self.feedforward[name] = ff

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.feedforward.pop(name, None)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str = "") -> None:
        self.copy_checked(self.adapter_state_dict(name), state, where)

    def _scales(self, names: tuple[str, ...], feedforward: bool, dtype: torch.dtype) -> torch.Tensor | None:
        vectors = [self.ia3_l[n].reshape(-1) for n in names if self.feedforward[n] == feedforward]
        if not vectors:
            return None
        scale = vectors[0]
        for vector in vectors[1:]:
            scale = scale * vector
        return scale.to(dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.unmerged_active
        if not active:
            return self.base_layer(x, *args, **kwargs)
        input_scale = self._scales(active, True, x.dtype)
        out = self.base_layer(x * input_scale if input_scale is not None else x, *args, **kwargs)
        output_scale = self._scales(active, False, out.dtype)
        return out * output_scale if output_scale is not None else out

    # ---- merge ----------------------------------------------------------------------------------------------
    def _weight_scale(self, name: str, ndim: int) -> torch.Tensor:
        """The vector shaped to broadcast over the weight axis it scales."""
        axis = 1 - self.out_axis if self.feedforward[name] else self.out_axis
        shape = [1] * ndim
        shape[axis] = -1
        return self.ia3_l[name].detach().float().reshape(shape)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._weight_scale(name, weight.dim())

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        scale = self._weight_scale(name, weight.dim())
        if (scale == 0).any():
            raise MergeError(
                f"adapter {name!r} has zero scaling entries, so its merge cannot be undone; reload the base model"
            )
        return weight / scale

    def merged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor | None:
        return None if self.feedforward[name] else bias * self.ia3_l[name].detach().float().reshape(-1)

    def unmerged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor | None:
        return None if self.feedforward[name] else bias / self.ia3_l[name].detach().float().reshape(-1)


class Ia3Method(AdapterMethod):
    config_class = Ia3Config
    layer_class = Ia3Linear
    supported_modules = "nn.Linear, transformers Conv1D"
    capabilities = frozenset(
        {Capability.MERGE, Capability.SHARE_PREFIX, Capability.STATIC_CACHE, Capability.CHECKPOINTED}
    )

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_hf_conv1d(module)

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> Ia3Linear:
        if not cls.can_wrap(module):
            raise TargetingError(
                f"{module_name}: IA3 cannot wrap {type(module).__name__}; it supports {cls.supported_modules}"
            )
        return Ia3Linear(module, fan_in_fan_out=is_hf_conv1d(module))


register("IA3")(Ia3Method)

IA3Config = Ia3Config  # PEFT's spelling, which users type
