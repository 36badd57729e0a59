"""Each adapted module's exact weight delta, the one thing combination and conversion are defined on.

Combining adapters by their factors (A with A, B with B) adds cross terms B_i A_j that neither adapter
learned; every method here works on ΔW_i = s_i B_i A_i instead, with each adapter's own scaling (rsLoRA,
`alpha_pattern`, `rank_pattern`). Deltas are kept in LoRA's layout, a matrix (out, in) with convolution
kernels flattened into `in` and embeddings transposed, so the result factors straight back into lora_B, lora_A.
A plain LoRA's delta stays low-rank (B, A with the scaling folded into B); any other mergeable method (DoRA,
IA3, a linear bottleneck) gives its exact dense delta, merged_weight(W) - W, computed from the dequantized
reference weight when the base is quantized.

A LoRA on a parameter (target_parameters: fused MoE experts, a router's weight) gives one delta per expert,
each a plain low-rank matrix, keyed "<module>.<parameter>#<expert>" (a 2-D parameter is expert 0): every rule
then combines expert with expert, and the result goes back into PEFT's per-expert layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.adapters import adapter_layers, all_wrappers
from ..core.capabilities import Capability, capability_refusal
from ..core.errors import CombineError
from ..core.layer import AdapterLayer, ModulesToSaveWrapper
from ..core.param_targets import unwrapped_name
from ..core.targeting import is_hf_conv1d
from ..methods.lora.layers import LoraLayer
from ..methods.lora.parameters import LoraParameter

EXPERT_MARK = "#"


def parameter_key(owner: str, parameter: str, expert: int) -> str:
    """The delta key of expert `expert` of parameter `parameter` of module `owner`."""
    return f"{owner}.{parameter}{EXPERT_MARK}{expert}"


def split_parameter_key(key: str) -> tuple[str, str, int] | None:
    """(owner module, parameter, expert) of a parameter delta's key; None for a module's."""
    if EXPERT_MARK not in key:
        return None
    path, _, expert = key.rpartition(EXPERT_MARK)
    owner, _, parameter = path.rpartition(".")
    return owner, parameter, int(expert)


@dataclass
class ModuleDelta:
    """ΔW of one module in LoRA layout (out, in): `b @ a` when low-rank factors are known, else `full`."""

    b: torch.Tensor | None = None  # (out, r), the scaling folded in
    a: torch.Tensor | None = None  # (r, in)
    full: torch.Tensor | None = None  # (out, in)

    @property
    def low_rank(self) -> bool:
        return self.full is None

    @property
    def shape(self) -> tuple[int, int]:
        if self.full is not None:
            return tuple(self.full.shape)
        return self.b.shape[0], self.a.shape[1]

    def dense(self) -> torch.Tensor:
        return self.full if self.full is not None else self.b @ self.a

    def scaled(self, weight: float) -> ModuleDelta:
        if self.full is not None:
            return ModuleDelta(full=self.full * weight)
        return ModuleDelta(b=self.b * weight, a=self.a)


def lora_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """A delta shaped like `base.weight`, as the (out, in) matrix that LoRA's B @ A forms."""
    if is_hf_conv1d(base) or isinstance(base, nn.Embedding):
        return delta.t()
    return delta.flatten(1)


def weight_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Inverse of lora_layout: the (out, in) matrix shaped like `base.weight`."""
    if is_hf_conv1d(base) or isinstance(base, nn.Embedding):
        return delta.t()
    return delta.reshape(base.weight.shape) if base.weight.dim() > 2 else delta


def _dense_delta(layer: AdapterLayer, name: str, module_name: str) -> ModuleDelta:
    reason = capability_refusal(layer.adapter_configs[name], Capability.MERGE)
    if reason is None and not layer.quantized:
        reason = layer.merge_refusal(name)
    if reason:
        raise CombineError(f"{module_name}: adapter {name!r} has no exact weight delta: {reason}")
    weight = layer.base_weight_float()
    bias = getattr(layer.base_layer, "bias", None)
    if bias is not None:
        new_bias = layer.merged_bias(name, bias.detach().float())
        if new_bias is not None and not torch.equal(new_bias, bias.detach().float()):
            raise CombineError(
                f"{module_name}: adapter {name!r} also changes the layer's bias (max change "
                f"{float((new_bias - bias.float()).abs().max()):.3g}), which a LoRA cannot express; "
                "export it merged (export_merged) instead"
            )
    delta = layer.merged_weight(name, weight) - weight
    return ModuleDelta(full=lora_layout(layer.base_layer, delta).cpu())


def adapter_deltas(model: nn.Module, adapter_name: str) -> dict[str, ModuleDelta]:
    """{module name: ΔW} for every module adapter `adapter_name` adapts, in float32 on the CPU.

    Raises CombineError naming the module and the reason when one has no exact delta (prompt or prefix
    tuning, a non-linear bottleneck, an IA3 that rescales a bias)."""
    deltas = {}
    with torch.no_grad():
        for module_name, layer in adapter_layers(model):
            if adapter_name not in layer.adapter_configs:
                continue
            if isinstance(layer, LoraParameter):
                b_e, a_e = layer.expert_factors(adapter_name)
                owner = unwrapped_name(module_name)
                for expert in range(layer.num_experts):
                    deltas[parameter_key(owner, layer.parameter_name, expert)] = ModuleDelta(
                        b=b_e[expert].detach().float().cpu(), a=a_e[expert].detach().float().cpu()
                    )
            elif isinstance(layer, LoraLayer) and not layer.is_dora(adapter_name):
                a, b = layer.factors(adapter_name)
                deltas[module_name] = ModuleDelta(
                    b=b.detach().float().flatten(1).cpu() * layer.scaling[adapter_name],
                    a=a.detach().float().flatten(1).cpu(),
                )
            else:
                deltas[module_name] = _dense_delta(layer, adapter_name, module_name)
    if not deltas:
        raise CombineError(
            f"adapter {adapter_name!r} adapts no module with a weight (it lives in the model's inputs, like "
            "prompt or prefix tuning); it has no weight delta to combine or convert"
        )
    return deltas


def modules_to_save_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The full trained copies (`modules_to_save`) adapter `adapter_name` carries, keyed as in the base
    model's own state dict ("score.weight"), so a side file of them loads with load_state_dict."""
    state = {}
    for module_name, wrapper in all_wrappers(model):
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.adapter_state_dict(adapter_name).items():
                state[f"{module_name}.{key}"] = tensor.detach().cpu().contiguous()
    return state
