"""LoRA, with rsLoRA and DoRA as options. Registered as peft_type "LORA"."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...core.capabilities import Capability
from ...core.config import AdapterConfig
from ...core.errors import AdapterConfigError, AdapterFormatError, TargetingError
from ...core.method import AdapterMethod
from ...core.param_targets import fused_experts, parameter_owner, select_parameters, wrapper_names
from ...core.rebuilt_inputs import keep_rebuildable
from ...core.registry import register
from ...core.targeting import ALL_LINEAR, TargetPreview, candidate_modules, is_hf_conv1d, is_linear_like
from .config import LoraConfig
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from .parameters import LoraParameter

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
            Capability.STATIC_CACHE,
            Capability.CHECKPOINTED,
        }
    )

    @classmethod
    def refusal(cls, capability: Capability, config: AdapterConfig) -> str | None:
        if capability is Capability.MIXED_BATCH and getattr(config, "use_dora", False):
            return "it uses DoRA, whose per-row weight norm has no batched form here"
        if capability is Capability.MIXED_BATCH and getattr(config, "target_parameters", None):
            return (
                f"it adapts parameters by name (target_parameters {config.target_parameters}, e.g. fused MoE "
                "experts), whose update replaces a weight every row of a batch shares; rows with other adapters "
                "would each need their own copy of the expert weights. Serve it alone, or merge it"
            )
        return super().refusal(capability, config)

    @classmethod
    def resolve_config(cls, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """No target_modules: the model's attention query and value projections, by their usual names (none
        when target_parameters alone says what to adapt). all-linear on a model with fused MoE experts: the
        linear layers and the experts' parameters, written out by name, so the saved config selects in PEFT
        exactly what was trained (PEFT resolves all-linear on these models its own way)."""
        if _all_linear(config.target_modules):
            experts = fused_experts(model)
            if not experts:
                return config
            modules = _shortest_names(model, list(cls.preview(model, config).targets))
            parameters = sorted(
                {f"{owner.rsplit('.', 1)[-1]}.{p}" for owner, ps in experts.items() for p in ps}
            )
            named = list(dict.fromkeys([*(config.target_parameters or []), *parameters]))
            try:
                return dataclasses.replace(config, target_modules=modules or None, target_parameters=named)
            except AdapterConfigError as exc:
                raise AdapterConfigError(
                    f"target_modules=all-linear on {type(model).__name__} also adapts its fused experts "
                    f"({parameters}), which LoRA reaches as parameters, and: {exc}. Or name the layers to adapt "
                    "instead of all-linear, to leave the experts out"
                ) from None
        if config.target_modules is not None or getattr(config, "target_parameters", None):
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
    def preview(cls, model: nn.Module, config: AdapterConfig) -> TargetPreview:
        """The modules target_modules selects and the parameters target_parameters selects (under all-linear,
        also every fused expert parameter). A module may not be both a target and a parameter's owner."""
        entries = getattr(config, "target_parameters", None) or []
        if config.target_modules is None and entries:
            preview = TargetPreview({}, [], [])
        else:
            preview = super().preview(model, config)
        selected = select_parameters(model, entries) if entries else {}
        if _all_linear(config.target_modules):
            for owner, params in fused_experts(model).items():
                wanted = {*selected.get(owner, ()), *params}
                order = parameter_owner(model.get_submodule(owner))._parameters  # PEFT nests in this order
                selected[owner] = tuple(p for p in order if p in wanted)
        both = [name for name in selected if name in preview.targets]
        if both:
            raise TargetingError(
                f"{both[0]!r} is selected by target_modules and owns parameters target_parameters selects "
                f"({list(selected[both[0]])}); adapt the module or its parameters, not both (PEFT refuses it too)"
            )
        preview.parameters = selected
        return preview

    @classmethod
    def wrap_parameter(cls, module: nn.Module, parameter_name: str) -> LoraParameter:
        return LoraParameter(module, parameter_name)

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
        preview = cls.preview(model, config)
        _check_saved_parameters(model, config, state, source, preview)
        for name in preview.targets:
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


def _shortest_names(model: nn.Module, modules: list[str]) -> list[str]:
    """`modules` as target_modules entries: their leaf names when those select exactly them, else in full."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
    named = {n for n, _ in candidate_modules(model, lambda m: isinstance(m, LoraLayer))}
    by_leaf = {n for n in named if n.rsplit(".", 1)[-1] in leaves}
    return leaves if by_leaf == set(modules) else modules


def _all_linear(spec: object) -> bool:
    return spec == ALL_LINEAR or spec == [ALL_LINEAR]


def _check_saved_parameters(
    model: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor], source: str, preview: TargetPreview
) -> None:
    """Every parameter target's A factor has rank x experts rows; a file saved for another expert count says
    so by name."""
    prefix = config.state_key_prefix
    for owner_name, params in preview.parameters.items():
        owner = model.get_submodule(owner_name)
        for param, where in wrapper_names(owner_name, params).items():
            key = f"{prefix}{where}.lora_A.weight"
            if key not in state:
                continue  # named as a module without weights after loading
            shape = getattr(parameter_owner(owner), param).shape
            experts = shape[0] if len(shape) == 3 else 1
            rank, rows = config.rank_for(f"{owner_name}.{param}"), state[key].shape[0]
            if rows == rank * experts:
                continue
            if rows % rank == 0 and experts > 1:
                raise AdapterFormatError(
                    f"{source}: the adapter of {owner_name}.{param} was saved for {rows // rank} experts (lora_A has "
                    f"{rows} rows at rank {rank}); this model's has {experts}. Load it onto the model it was trained on"
                )
            raise AdapterFormatError(
                f"{source}: the config gives {owner_name}.{param} rank {rank} over {experts} expert(s), so lora_A "
                f"needs {rank * experts} rows, but the file's has {rows}; the config does not belong to these weights"
            )


register("LORA")(LoraMethod)

__all__ = ["LoraConfig", "LoraLayer", "LoraMethod"]
