"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020). Registered as peft_type "BOTTLENECK".

HF PEFT has no such method. deltatune keeps PEFT's file layout (adapter_config.json + adapter_model.safetensors,
keys `base_model.model.<module>.adapter_down.weight` ...) under its own peft_type, so PEFT itself cannot load
these files.

An adapter sits on the output h of a sub-layer's output projection, before the residual add:
    h' = h + up(act(down(dropout(h))))
with down: d -> b and up: b -> d (b = d // reduction_factor, or `bottleneck_size`), both with biases unless
`use_bias=False`. `up` starts at zero, so a new adapter is the identity. Several active adapters stack in
activation order (h' = a2(a1(h))).

Placement: `target_modules` names the output projections directly; without it, `placement` picks them for known
architectures: "attention" (after the attention output projection), "feedforward" (after the MLP's down
projection: Pfeiffer's placement) or "both" (Houlsby's).

Merging: with `non_linearity="identity"` the adapter is linear, h' = (I + U D) h + U b_d + b_u, and folds
exactly into the projection (W' = (I + U D) W, b' = (I + U D) b + U b_d + b_u; the bias part needs the base
layer to have a bias or the adapter to have none). With a non-linearity it cannot merge, and says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..core.capabilities import Capability
from ..core.config import AdapterConfig
from ..core.errors import AdapterConfigError, AdapterFormatError, TargetingError
from ..core.layer import AdapterLayer
from ..core.method import AdapterMethod
from ..core.registry import register
from ..core.targeting import is_hf_conv1d

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

# model_type -> (attention output projection, feed-forward output projection), as full-name regexes.
PLACEMENTS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), (r".*\.o_proj", r".*\.down_proj")
    ),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp\.c_proj"),
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "electra"),
        (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    ),
}
PLACEMENT_CHOICES = ("attention", "feedforward", "both")


@dataclass
class BottleneckConfig(AdapterConfig):
    """Without `target_modules`, `placement` picks the layers; saved configs hold the resolved targets."""

    placement: str = "both"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    use_bias: bool = True
    init_weights: bool = True  # False: random up-projection (not the identity), only useful for tests

    def validate(self) -> None:
        if self.placement not in PLACEMENT_CHOICES:
            raise AdapterConfigError(f"placement must be one of {PLACEMENT_CHOICES}, got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise AdapterConfigError(
                f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}"
            )
        if self.bottleneck_size is None and (
            not isinstance(self.reduction_factor, int) or self.reduction_factor < 1
        ):
            raise AdapterConfigError(
                f"reduction_factor must be a positive integer, got {self.reduction_factor!r}"
            )
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise AdapterConfigError(f"bottleneck_size must be positive, got {self.bottleneck_size}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise AdapterConfigError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")

    def width(self, features: int) -> int:
        return self.bottleneck_size or max(1, features // self.reduction_factor)


class BottleneckLayer(AdapterLayer):
    """Wraps nn.Linear or transformers Conv1D; the adapter acts on the layer's output."""

    adapter_attributes = ("adapter_down", "adapter_up", "adapter_act", "adapter_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.features = int(self.base_weight.shape[1] if fan_in_fan_out else self.base_weight.shape[0])
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()

    def create_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        assert isinstance(config, BottleneckConfig)
        width, device = config.width(self.features), self.base_weight.device
        down = nn.Linear(self.features, width, bias=config.use_bias, device=device)
        up = nn.Linear(width, self.features, bias=config.use_bias, device=device)
        if config.init_weights:
            nn.init.zeros_(up.weight)
            if up.bias is not None:
                nn.init.zeros_(up.bias)
        else:  # a clearly visible update (tests): unit-variance output per unit-variance input
            nn.init.normal_(up.weight, std=width**-0.5)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_act[name] = ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout[name] = (
            nn.Dropout(config.adapter_dropout) if config.adapter_dropout else nn.Identity()
        )

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        state = {f"adapter_down.{k}": v for k, v in self.adapter_down[name].named_parameters()}
        state.update({f"adapter_up.{k}": v for k, v in self.adapter_up[name].named_parameters()})
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str = "") -> None:
        self.copy_checked(self.adapter_state_dict(name), state, where, hint=" (bottleneck size or use_bias)")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active:
            down, up = self.adapter_down[name], self.adapter_up[name]
            hidden = self.adapter_act[name](down(self.adapter_dropout[name](out.to(down.weight.dtype))))
            out = out + up(hidden).to(out.dtype)
        return out

    # ---- merge (identity non-linearity only) ------------------------------------------------------------------
    def merge_refusal(self, name: str) -> str | None:
        quantized = super().merge_refusal(name)
        if quantized:
            return quantized
        if self.adapter_down[name].bias is not None and getattr(self.base_layer, "bias", None) is None:
            return (
                "the adapter has biases but the base layer has none to fold them into (use_bias=False merges)"
            )
        return None

    def _operator(self, name: str) -> torch.Tensor:
        """I + U D, the linear map the adapter applies to the layer output."""
        down, up = (
            self.adapter_down[name].weight.detach().float(),
            self.adapter_up[name].weight.detach().float(),
        )
        return torch.eye(self.features, device=down.device) + up @ down

    def _offset(self, name: str) -> torch.Tensor:
        """U b_d + b_u: what the adapter adds independently of its input."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        if down.bias is None:
            return torch.zeros(self.features, device=down.weight.device)
        return up.weight.detach().float() @ down.bias.detach().float() + up.bias.detach().float()

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        op = self._operator(name)
        return weight @ op.T if self.fan_in_fan_out else op @ weight

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        op = self._operator(name).double()
        if self.fan_in_fan_out:
            return torch.linalg.solve(op, weight.double().T).T.float()
        return torch.linalg.solve(op, weight.double()).float()

    def merged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor | None:
        return self._operator(name) @ bias + self._offset(name)

    def unmerged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor | None:
        op = self._operator(name).double()
        return torch.linalg.solve(op, (bias - self._offset(name)).double()).float()


class BottleneckMethod(AdapterMethod):
    config_class = BottleneckConfig
    layer_class = BottleneckLayer
    supported_modules = "nn.Linear, transformers Conv1D (the output projection of a sub-layer)"
    capabilities = frozenset(
        {Capability.MERGE, Capability.SHARE_PREFIX, Capability.STATIC_CACHE, Capability.CHECKPOINTED}
    )

    @classmethod
    def refusal(cls, capability: Capability, config: AdapterConfig) -> str | None:
        non_linearity = getattr(config, "non_linearity", "identity")
        if capability is Capability.MERGE and non_linearity != "identity":
            return f"its non-linearity ({non_linearity}) is not linear; only non_linearity='identity' merges"
        return super().refusal(capability, config)

    @classmethod
    def check_saved_state(
        cls, model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor], source: str
    ) -> None:
        """An explicit bottleneck_size is the width of every saved down projection (a reduction_factor is
        bounded by the model's own widths)."""
        assert isinstance(config, BottleneckConfig)
        if config.bottleneck_size is None:
            return
        widths = {t.shape[0] for k, t in state.items() if k.endswith(".adapter_down.weight")}
        if widths and widths != {config.bottleneck_size}:
            raise AdapterFormatError(
                f"{source}: bottleneck_size={config.bottleneck_size}, but the saved down projections are "
                f"{sorted(widths)} wide; the config does not belong to these weights"
            )

    @classmethod
    def resolve_config(cls, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        assert isinstance(config, BottleneckConfig)
        if config.target_modules not in (None, [], ""):
            return config
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PLACEMENTS:
            raise TargetingError(
                f"placement={config.placement!r} has no preset for model_type {model_type!r} (presets: "
                f"{sorted(PLACEMENTS)}); name the output projections in target_modules, e.g. ['o_proj', 'down_proj']"
            )
        attention, feedforward = PLACEMENTS[model_type]
        chosen = {"attention": attention, "feedforward": feedforward, "both": f"{attention}|{feedforward}"}
        return dataclasses.replace(config, target_modules=chosen[config.placement])

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_hf_conv1d(module)

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> BottleneckLayer:
        if not cls.can_wrap(module):
            raise TargetingError(
                f"{module_name}: a bottleneck adapter cannot wrap {type(module).__name__}; it supports "
                f"{cls.supported_modules}"
            )
        return BottleneckLayer(module, fan_in_fan_out=is_hf_conv1d(module))


register("BOTTLENECK")(BottleneckMethod)
