"""From adapter folders to a new plain-LoRA folder: read each source's exact deltas, write the result, and
measure it against the exact (untruncated) delta on a sample.

The output is PEFT's LoRA format with one `lora_alpha` and no rsLoRA, DoRA or `alpha_pattern`, the form
every engine accepts: lora_alpha = r (the most common rank), each module's scaling folded into its lora_B,
and `rank_pattern` only for modules whose rank differs from r.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from ..core.adapters import adapter_configs, adapter_layers, disable_adapter
from ..core.atomic import staged_folder
from ..core.config import AdapterConfig
from ..core.errors import CombineError
from ..core.export import logits_of, sample_inputs
from ..core.hashing import sha256_file
from ..core.inject import eject, inject
from ..core.io import WEIGHTS_NAME, load_adapter, resolve_safetensors_adapter, save_adapter
from ..core.layer import weights_follow
from ..core.modes import eval_mode
from ..core.param_targets import parameter_owner, unwrapped_name
from ..core.quantized import is_quantized
from ..core.targeting import name_matches
from ..methods.lora import LoraConfig
from ..methods.lora.parameters import LoraParameter
from .deltas import ModuleDelta, adapter_deltas, modules_to_save_state, split_parameter_key, weight_layout
from .lowrank import Factors

RESULT_NAME = "combined"  # the new adapter's name while it is in the model
SIDE_FILE = "modules_to_save.safetensors"


@dataclass
class Source:
    """One input adapter, read: where from, its config, and its deltas."""

    folder: Path
    sha256: str
    config: AdapterConfig
    deltas: dict[str, ModuleDelta]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "path": str(self.folder),
            "sha256": self.sha256,
            "peft_type": config.peft_type,
            "rank": getattr(config, "r", None),
            "use_rslora": getattr(config, "use_rslora", None),
            "use_dora": getattr(config, "use_dora", None),
            "modules": len(self.deltas),
        }

    @property
    def rank(self) -> int | None:
        """Its largest rank where its deltas come as low-rank factors (plain LoRA), else None."""
        ranks = [d.a.shape[0] for d in self.deltas.values() if d.low_rank]
        return max(ranks) if ranks else None


def read_source(model: nn.Module, folder: str | Path, **load_options: Any) -> Source:
    """Load the adapter at `folder` into `model`, take its deltas, and remove it again (the model comes back
    as it was: without wrappers)."""
    folder = resolve_safetensors_adapter(folder)
    present = sorted(adapter_configs(model))
    if present:
        raise CombineError(
            f"pass the bare base model: this one carries adapters {present}, and combining starts from the base "
            "(deltatune.eject(model, merge=False) removes them)"
        )
    load_adapter(model, folder, "source", **load_options)
    try:
        config = adapter_configs(model)["source"]
        return Source(
            folder=folder,
            sha256=sha256_file(folder / WEIGHTS_NAME),
            config=config,
            deltas=adapter_deltas(model, "source"),
            modules_to_save=modules_to_save_state(model, "source"),
        )
    finally:
        eject(model, merge=False)


def in_model_order(model: nn.Module, names: set[str]) -> list[str]:
    """Module (and parameter-delta) keys in the order the model holds them: the same order every run, which
    seeded rules (dare) rely on."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def place(key: str) -> tuple[int, str, int]:
        split = split_parameter_key(key)
        if split is None:
            return order.get(key, len(order)), "", 0
        owner, parameter, expert = split
        return order.get(owner, len(order)), parameter, expert

    return sorted(names, key=place)


def target_list(model: nn.Module, names: set[str]) -> list[str]:
    """The shortest PEFT `target_modules` list that selects exactly `names`: their last name parts
    ("q_proj") when those select nothing else, else the full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    selected = {n for n, _ in model.named_modules() if name_matches(n, suffixes)}
    return suffixes if selected == names else in_model_order(model, names)


def plain_lora_config(
    model: nn.Module, ranks: dict[str, int], like: AdapterConfig, parameters: frozenset[str] = frozenset()
) -> LoraConfig:
    """`ranks`: module name, or for the `parameters` targets "<module>.<parameter>", -> its rank."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    modules = set(ranks) - parameters
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_list(model, modules) if modules else None,
        target_parameters=sorted(parameters) or None,
        rank_pattern={re.escape(name): rank for name, rank in ranks.items() if rank != r},
        task_type=like.task_type,
        base_model_name_or_path=like.base_model_name_or_path,
    )


def inject_factors(model: nn.Module, factors: dict[str, Factors], like: AdapterConfig) -> LoraConfig:
    """Add the plain LoRA adapter RESULT_NAME holding `factors` (scaling folded into B) to the bare `model`.
    A parameter's experts share one rank (PEFT's layout): each is padded with zero factors to the largest."""
    experts = by_parameter(factors)
    ranks = {name: f.rank for name, f in factors.items() if split_parameter_key(name) is None}
    ranks |= {key: max(f.rank for f in fs) for key, fs in experts.items()}
    config = plain_lora_config(model, ranks, like, frozenset(experts))
    with weights_follow():
        inject(model, config, RESULT_NAME)
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            a, b = layer.factors(RESULT_NAME)
            if isinstance(layer, LoraParameter):
                key = f"{unwrapped_name(name)}.{layer.parameter_name}"
                fa, fb = _expert_stack(experts[key], ranks[key])
            else:
                fa, fb = factors[name].a, factors[name].b
            a.copy_(fa.reshape(a.shape))
            b.copy_((fb / layer.scaling[RESULT_NAME]).reshape(b.shape))
    return config


def by_parameter(factors: dict[str, Any]) -> dict[str, list[Any]]:
    """The parameter targets' factors, "<module>.<parameter>" -> one per expert, in expert order."""
    grouped: dict[str, dict[int, Factors]] = {}
    for name, f in factors.items():
        split = split_parameter_key(name)
        if split is not None:
            owner, parameter, expert = split
            grouped.setdefault(f"{owner}.{parameter}", {})[expert] = f
    return {key: [found[e] for e in sorted(found)] for key, found in grouped.items()}


def _expert_stack(factors: list[Factors], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors (padded to `rank`) in PEFT's layout: A (rank*E, in) with expert e's rows at
    [e*rank, (e+1)*rank); B (out, rank*E) with expert e's columns at e, E + e, ..."""
    a_e, b_e = [], []
    for f in factors:
        pad = rank - f.rank
        a_e.append(torch.cat([f.a, f.a.new_zeros(pad, f.a.shape[1])]) if pad else f.a)
        b_e.append(torch.cat([f.b, f.b.new_zeros(f.b.shape[0], pad)], 1) if pad else f.b)
    return torch.cat(a_e), torch.stack(b_e, dim=-1).flatten(1)


@contextmanager
def deltas_added(model: nn.Module, deltas: dict[str, ModuleDelta]) -> Iterator[None]:
    """While inside, each named base module outputs base(x) + ΔW x, by a forward hook (nothing is written
    into the weights, so a quantized base works too)."""
    modules = dict(model.named_modules())

    def hook_for(delta: ModuleDelta):
        busy = []  # set while the module runs again for ΔW x, whose output must not get this hook's addition

        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if busy:
                return output
            dense = delta.dense()
            weight = module.weight
            if is_quantized(module):  # packed storage; quantized layers are Linear-like
                extra = torch.nn.functional.linear(args[0], dense.to(args[0].dtype))
            else:
                override = {"weight": weight_layout(module, dense).to(weight.dtype)}
                if getattr(module, "bias", None) is not None:
                    override["bias"] = None
                busy.append(True)
                try:
                    extra = functional_call(module, override, args)
                finally:
                    busy.clear()
            return output + extra

        return add

    with ExitStack() as stack:
        for name, delta in deltas.items():
            if split_parameter_key(name) is not None:
                continue
            wrapper = modules[name]
            target = getattr(wrapper, "base_layer", wrapper)
            stack.callback(target.register_forward_hook(hook_for(delta)).remove)
        for key, per_expert in by_parameter(deltas).items():
            _add_to_parameter(stack, model, key, per_expert)
        yield


def _add_to_parameter(stack: ExitStack, model: nn.Module, key: str, per_expert: list[ModuleDelta]) -> None:
    """Add the per-expert deltas to parameter `key` ("<module>.<parameter>") in place until `stack` closes:
    a mixture of experts is not linear in its weights, so the delta goes into the weight, not the output."""
    owner_name, _, parameter_name = key.rpartition(".")
    outer = model.get_submodule(owner_name)
    parameter = getattr(parameter_owner(outer), parameter_name)
    layer = outer
    while getattr(layer, "parameter_name", parameter_name) != parameter_name:
        layer = layer.base_layer
    dense = torch.stack([d.dense() for d in per_expert])  # (E, out, in)
    if getattr(layer, "transposed", False):
        dense = dense.transpose(1, 2)
    dense = dense.reshape(parameter.shape).to(parameter.device, parameter.dtype)
    original = parameter.detach().clone()
    with torch.no_grad():
        parameter.add_(dense)
    stack.callback(lambda: parameter.data.copy_(original))


@torch.no_grad()
def logit_error(model: nn.Module, exact: dict[str, ModuleDelta], sample: Any) -> dict[str, Any] | None:
    """Max |logit difference| between the written LoRA (active in `model`) and the exact combined delta,
    and how far the exact delta moves the logits from the base's (the scale the error is read against)."""
    prepared = sample_inputs(model, sample)
    if prepared is None:
        return None
    inputs, described = prepared
    with eval_mode(model):
        written = logits_of(model, inputs)
        with disable_adapter(model):
            base = logits_of(model, inputs)
            with deltas_added(model, exact):
                reference = logits_of(model, inputs)
    return {
        "sample": described,
        "max_abs_error": float((written - reference).abs().max()),
        "mean_abs_error": float((written - reference).abs().mean()),
        "exact_max_abs_effect": float((reference - base).abs().max()),
        "exact_mean_abs_effect": float((reference - base).abs().mean()),
    }


def write_result(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer: Any = None,
    derived_from: dict[str, Any],
    side_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save RESULT_NAME (and the modules_to_save side file, if any) into `out` as one atomic folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CombineError(f"{out} exists and is a file; the result is written as an adapter folder")
    with staged_folder(out, whole=True) as staging:
        save_adapter(model, staging, RESULT_NAME, tokenizer=tokenizer, derived_from=derived_from)
        if side_state:
            save_file(side_state, staging / SIDE_FILE, metadata={"format": "pt"})
    return out
