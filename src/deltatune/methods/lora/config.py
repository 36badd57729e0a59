"""LoraConfig with Hugging Face PEFT's field names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...core import patterns
from ...core.config import AdapterConfig
from ...core.errors import AdapterConfigError

# PEFT LoRA fields for features deltatune does not implement (harmless only at their neutral default).
_PEFT_ONLY = frozenset(
    {
        "alora_invocation_tokens", "arrow_config", "corda_config", "ensure_weight_tying", "eva_config",
        "kasa_config", "layer_replication", "loftq_config", "lora_bias", "lora_ga_config", "megatron_config",
        "monteclora_config", "trainable_token_indices", "use_bdlora", "use_qalora",
        "velora_config",
    }
)  # fmt: skip
_INIT_CHOICES = (True, False, "gaussian")


def _pattern_value(by_pattern: dict[str, float], module_name: str) -> float | None:
    """PEFT's rule: a key matches when it matches the end of the module name at a '.' boundary."""
    for key, value in by_pattern.items():
        if patterns.matches(rf"(.*\.)?({key})$", module_name, whole=False):
            return value
    return None


MAX_ALPHA = 1e6  # configs in the wild use 1-512; beyond this the update overflows float16/float32 outputs


def _check_alpha(name: str, alpha: float) -> None:
    """A finite alpha so large that every output overflows would load and then fail every request (the
    server answered 500 for lora_alpha 1e308): refused at load, like NaN."""
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and abs(alpha) > MAX_ALPHA:
        raise AdapterConfigError(
            f"{name} is {alpha:g}; its magnitude must be at most {MAX_ALPHA:g} (configs use 1-512). An alpha this "
            "large overflows every output: the config is broken"
        )


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, A: (r, in), B: (out, r), B = 0 at init.

    use_rslora: scale by alpha / sqrt(r) (Kalajdzievski 2023). use_dora: DoRA (Liu et al. 2024),
    W' = m * (W + s B A) / ||W + s B A||, with the norm taken per output feature and treated as a constant
    in the backward pass (the paper's section 4.3, as PEFT does).
    """

    required_keys: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "target_modules")
    peft_only_fields: ClassVar[frozenset[str]] = _PEFT_ONLY

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    # Parameters adapted by name (PEFT's rule: "<module>.<parameter>" equal to or ending with an entry): fused
    # MoE experts (experts x out x in, transformers 5) and routers' bare weights, which no layer holds.
    target_parameters: list[str] | None = None

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise AdapterConfigError(
                f"bias={self.bias!r} is not supported: training base biases in place makes disable/unmerge "
                "inexact. Use bias='none', and put layers whose bias must train in modules_to_save."
            )
        if self.init_lora_weights not in _INIT_CHOICES:
            raise AdapterConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; choose one of {list(_INIT_CHOICES)}"
            )
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise AdapterConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        if self.target_parameters:
            self._check_target_parameters()
        for name, alpha in [("lora_alpha", self.lora_alpha), *(
            (f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:  # fmt: skip
            _check_alpha(name, alpha)

    def _check_target_parameters(self) -> None:
        """What PEFT refuses for parameter targets, refused here too (an adapter PEFT cannot load is no PEFT
        adapter): each changes a layer's input or output, and a parameter target has only its weight."""
        if any(not isinstance(e, str) or not e.strip() for e in self.target_parameters):
            raise AdapterConfigError(
                f"target_parameters must be parameter names, got {self.target_parameters!r}"
            )
        for field_name, value, why in (
            ("lora_dropout", self.lora_dropout, "dropout acts on a layer's input, and a parameter target's LoRA is "
             "folded into the weight"),
            ("use_dora", self.use_dora, "DoRA's per-output norm of a fused expert stack is not defined"),
            ("fan_in_fan_out", self.fan_in_fan_out, "the layout of a parameter target comes from its shape"),
        ):  # fmt: skip
            if value:
                raise AdapterConfigError(
                    f"{field_name}={value!r} with target_parameters {self.target_parameters}: {why}; PEFT refuses "
                    f"it as well. Set {field_name} to {0.0 if field_name == 'lora_dropout' else False}"
                )

    def rank_for(self, module_name: str) -> int:
        value = _pattern_value(self.rank_pattern, module_name)
        return self.r if value is None else int(value)

    def scaling_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        alpha = _pattern_value(self.alpha_pattern, module_name)
        alpha = self.lora_alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r
