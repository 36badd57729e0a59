"""LoRA, with rsLoRA and DoRA as options. Registered as peft_type "LORA"."""

from __future__ import annotations

from torch import nn

from ...core.errors import TargetingError
from ...core.method import AdapterMethod
from ...core.registry import register
from ...core.targeting import is_hf_conv1d
from .config import LoraConfig
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoraMethod(AdapterMethod):
    config_class = LoraConfig
    layer_class = LoraLayer
    supported_modules = "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, transformers Conv1D (and their subclasses)"

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
