"""LoRA, with rsLoRA and DoRA as options. Registered as peft_type "LORA"."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...core.capabilities import Capability
from ...core.config import AdapterConfig
from ...core.errors import AdapterFormatError, TargetingError
from ...core.method import AdapterMethod
from ...core.rebuilt_inputs import keep_rebuildable
from ...core.registry import register
from ...core.targeting import is_hf_conv1d, is_linear_like
from .config import LoraConfig
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# With no target_modules, LoRA adapts attention's query and value projections, as PEFT's per-architecture
# defaults do; these are the names transformers' architectures give them (fused ones stand for both).
QUERY_AND_VALUE = (
    ("q_proj", "v_proj"), ("query", "value"), ("query_proj", "value_proj"), ("q", "v"), ("c_attn",),
    ("query_key_value",), ("qkv_proj",), ("Wqkv",), ("in_proj",),
)  # fmt: skip


class LoraMethod(AdapterMethod):
    config_class = LoraConfig
    layer_class = LoraLayer
    supported_modules = "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, transformers Conv1D (and their subclasses)"
    capabilities = frozenset(
        {
            Capability.MERGE,
            Capability.MIXED_BATCH,
            Capability.HOTSWAP,
            Capability.SHARE_PREFIX,
            Capability.CHECKPOINTED,
        }
    )

    @classmethod
    def refusal(cls, capability: Capability, config: AdapterConfig) -> str | None:
        if capability is Capability.MIXED_BATCH and getattr(config, "use_dora", False):
            return "it uses DoRA, whose per-row weight norm has no batched form here"
        return super().refusal(capability, config)

    @classmethod
    def resolve_config(cls, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """No target_modules: the model's attention query and value projections, by their usual names."""
        if config.target_modules is not None:
            return config
        names = {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if is_linear_like(m) or isinstance(m, LoraLayer)
        }
        for group in QUERY_AND_VALUE:
            if set(group) <= names:
                return dataclasses.replace(config, target_modules=list(group))
        raise TargetingError(
            f"target_modules is not set and {type(model).__name__} has no attention projections under the usual "
            "names (q_proj / v_proj, query / value, c_attn, ...); name the modules to adapt, a regex, or 'all-linear'"
        )

    @classmethod
    def check_saved_state(
        cls, model: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor], source: str
    ) -> None:
        """Every module the config targets has its A factor in `state`, of the rank the config gives it."""
        config = cls.resolve_config(model, config)
        prefix = config.state_key_prefix
        saved_ranks = [
            t.shape[0] for k, t in state.items() if k.endswith((".lora_A.weight", ".lora_embedding_A"))
        ]
        largest = max(saved_ranks, default=0)
        for name in cls.preview(model, config).targets:
            rank = config.rank_for(name)
            keys = (f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_embedding_A")
            key = next((k for k in keys if k in state), None)
            if key is not None and state[key].shape[0] != rank:
                raise AdapterFormatError(
                    f"{source}: the config gives {name!r} rank {rank} (r / rank_pattern), but its saved "
                    f"weights have rank {state[key].shape[0]}; the config does not belong to these weights"
                )
            if key is None and rank > largest:  # a missing module is named after loading, unless its size
                raise AdapterFormatError(  # alone is a problem
                    f"{source}: the config gives {name!r} rank {rank}, but it has no saved weights and no "
                    f"saved factor has a rank over {largest}; the config does not belong to these weights"
                )

    @classmethod
    def attach(cls, model: nn.Module, wrappers: list) -> None:
        """Let the fused kernel rebuild a norm's output or a gated MLP's product in backward instead of
        saving it (core.rebuilt_inputs): all-linear LoRA then keeps ~160 MiB less on SmolLM2 at 4 x 128."""
        keep_rebuildable(model)

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Embedding, *_CONVS)) or is_hf_conv1d(module)

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> LoraLayer:
        if isinstance(module, nn.Linear):
            return LoraLinear(module, fan_in_fan_out=False)
        if is_hf_conv1d(module):
            return LoraLinear(module, fan_in_fan_out=True)
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None:
                raise TargetingError(
                    f"{module_name}: nn.Embedding with max_norm renormalises weights in place; "
                    "LoRA on it is not supported. Leave it out of target_modules."
                )
            return LoraEmbedding(module)
        if isinstance(module, _CONVS):
            if module.groups != 1:
                raise TargetingError(
                    f"{module_name}: grouped/depthwise convolutions (groups={module.groups}) are "
                    "not supported by LoRA yet; leave them out of target_modules."
                )
            return LoraConv(module)
        raise TargetingError(
            f"{module_name}: LoRA cannot wrap {type(module).__name__}; it supports {cls.supported_modules}"
        )


register("LORA")(LoraMethod)

__all__ = ["LoraConfig", "LoraLayer", "LoraMethod"]
