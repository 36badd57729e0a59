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
from ..core.quantized import is_quantized
from ..core.targeting import name_matches
from ..methods.lora import LoraConfig
from .deltas import ModuleDelta, adapter_deltas, modules_to_save_state, weight_layout
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
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(names, key=lambda n: order.get(n, len(order)))


def target_list(model: nn.Module, names: set[str]) -> list[str]:
    """The shortest PEFT `target_modules` list that selects exactly `names`: their last name parts
    ("q_proj") when those select nothing else, else the full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    selected = {n for n, _ in model.named_modules() if name_matches(n, suffixes)}
    return suffixes if selected == names else in_model_order(model, names)


def plain_lora_config(model: nn.Module, ranks: dict[str, int], like: AdapterConfig) -> LoraConfig:
    r = Counter(ranks.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_list(model, set(ranks)),
        rank_pattern={re.escape(name): rank for name, rank in ranks.items() if rank != r},
        task_type=like.task_type,
        base_model_name_or_path=like.base_model_name_or_path,
    )


def inject_factors(model: nn.Module, factors: dict[str, Factors], like: AdapterConfig) -> LoraConfig:
    """Add the plain LoRA adapter RESULT_NAME holding `factors` (scaling folded into B) to the bare `model`."""
    config = plain_lora_config(model, {name: f.rank for name, f in factors.items()}, like)
    with weights_follow():
        inject(model, config, RESULT_NAME)
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            f = factors[name]
            a, b = layer.factors(RESULT_NAME)
            a.copy_(f.a.reshape(a.shape))
            b.copy_((f.b / layer.scaling[RESULT_NAME]).reshape(b.shape))
    return config


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
            wrapper = modules[name]
            target = getattr(wrapper, "base_layer", wrapper)
            stack.callback(target.register_forward_hook(hook_for(delta)).remove)
        yield


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
