"""Which modules an adapter config selects, with PEFT's matching rules and helpful errors.

- `target_modules` as a string: regular expression that must match the full module name (re.fullmatch).
- as a list: a module matches when its name equals an entry or ends with "." + entry.
- "all-linear": every linear layer (nn.Linear, transformers' Conv1D) except the model's output head.
- `exclude_modules`: the same rules, applied after.
- `layers_to_transform`: keep only modules inside those layer indices (found via `layers_pattern`).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from . import patterns
from .config import AdapterConfig
from .errors import TargetingError
from .layer import AdapterLayer, modules_outside_adapters

ALL_LINEAR = "all-linear"
_DEFAULT_LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block", "encoder.layer", "decoder.layers")


def is_hf_conv1d(module: nn.Module) -> bool:
    """GPT-2 style transformers Conv1D (a linear layer with weight stored as (in, out))."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return mod is not None and isinstance(module, mod.Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


@dataclass
class TargetPreview:
    """What a config selects: `targets` maps module name -> module type name; `parameters` (LoRA's
    target_parameters, and fused experts under all-linear) maps a module name -> the parameters of it adapted."""

    targets: dict[str, str]
    excluded: list[str]
    skipped_by_layer: list[str]
    left_out: dict[str, str] = field(default_factory=dict)  # linear layers all-linear did not take, and why
    parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.targets)} module(s) targeted:"]
        if self.parameters:
            keys = [f"{owner}.{p}" for owner, params in self.parameters.items() for p in params]
            shown = keys if len(keys) <= 8 else keys[:4] + ["..."] + keys[-3:]
            lines = [f"{len(keys)} parameter(s) targeted (fused experts, target_parameters):"]
            lines += [f"  {k}" for k in shown] + [f"{len(self.targets)} module(s) targeted:"]
        by_type: dict[str, int] = {}
        for type_name in self.targets.values():
            by_type[type_name] = by_type.get(type_name, 0) + 1
        lines.append("  by type: " + ", ".join(f"{t} x{n}" for t, n in sorted(by_type.items())))
        names = list(self.targets)
        shown = names if len(names) <= 12 else names[:6] + ["..."] + names[-5:]
        lines += [f"  {n}" for n in shown]
        if self.excluded:
            lines.append(f"  excluded by exclude_modules: {len(self.excluded)}")
        if self.skipped_by_layer:
            lines.append(f"  outside layers_to_transform: {len(self.skipped_by_layer)}")
        lines += [f"  left out: {name}: {why}" for name, why in self.left_out.items()]
        return "\n".join(lines)


def name_matches(name: str, spec: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches by dotted suffix."""
    if isinstance(spec, str):
        return patterns.matches(spec, name)
    return any(name == key or name.endswith("." + key) for key in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return {
            n for n, _ in modules_outside_adapters(model) if n.split(".")[-1] in ("lm_head", "output_layer")
        }
    return {n for n, m in modules_outside_adapters(model) if m is head}


def _layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    if patterns is None:
        patterns = list(_DEFAULT_LAYER_CONTAINERS)
    elif isinstance(patterns, str):
        patterns = [patterns]
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def suggest_names(missing: str, names: list[str]) -> list[str]:
    leaves = sorted({n.split(".")[-1] for n in names if n})
    pool = leaves + [n for n in names if n]
    return difflib.get_close_matches(missing, pool, n=5, cutoff=0.4)


def uncalled_layers(model: nn.Module) -> dict[str, str]:
    """Layers whose weight the model uses without calling them, so a wrapper on one would never run: name ->
    why. nn.MultiheadAttention hands `out_proj.weight` straight to the functional attention (SigLIP's and
    CLIP-style pooling heads use it)."""
    return {
        f"{name}.out_proj" if name else "out_proj": (
            f"{type(module).__name__} passes out_proj's weight to its functional attention without calling "
            "out_proj, so an adapter there would never run (its in_proj_weight is a bare parameter too)"
        )
        for name, module in modules_outside_adapters(model)
        if isinstance(module, nn.MultiheadAttention)
    }


def candidate_modules(
    model: nn.Module, is_wrapper: Callable[[nn.Module], bool]
) -> list[tuple[str, nn.Module]]:
    """Named submodules, leaving out everything inside a wrapper (base_layer, lora_A, ...): the wrapper
    itself stands for the module it wraps. Any method's wrapper counts, so one method never wraps another's
    base_layer from the inside."""

    def wraps(module: nn.Module) -> bool:
        return is_wrapper(module) or isinstance(module, AdapterLayer)

    return [(n, m) for n, m in modules_outside_adapters(model, stop_at=wraps) if n]


def _shown(spec: str | list[str]) -> str:
    """target_modules as an error shows it: a long list (a saved config names every module) by its start."""
    if isinstance(spec, list) and len(spec) > 4:
        return f"[{', '.join(map(repr, spec[:3]))}, ... {len(spec)} names]"
    return repr(spec)


def select_targets(
    model: nn.Module,
    config: AdapterConfig,
    can_wrap: Callable[[nn.Module], bool],
    supported: str,
    is_wrapped: Callable[[nn.Module], bool] = lambda m: False,
) -> TargetPreview:
    """Resolve `config` against `model`. Raises TargetingError when the result would surprise the user."""
    spec = config.target_modules
    if spec is None or spec == [] or spec == "":
        raise TargetingError(
            "target_modules is empty; name the modules to adapt, e.g. ['q_proj', 'v_proj'], a regex, or 'all-linear'"
        )
    named = candidate_modules(model, is_wrapped)
    names = [n for n, _ in named]
    all_linear = spec == ALL_LINEAR or (isinstance(spec, list) and spec == [ALL_LINEAR])
    uncalled = uncalled_layers(model)
    if all_linear:
        heads = _output_head_names(model) | set(config.modules_to_save or [])
        hits = [
            (n, m)
            for n, m in named
            if (is_linear_like(m) or (isinstance(m, AdapterLayer) and not getattr(m, "parameter_name", None)))
            and n not in heads
        ]
        hits = [(n, m) for n, m in hits if not name_matches(n, sorted(heads)) and n not in uncalled]
    else:
        hits = [(n, m) for n, m in named if name_matches(n, spec)]
        if isinstance(spec, list):
            unmatched = [key for key in spec if not any(name_matches(n, [key]) for n in names)]
            if unmatched:
                key = unmatched[0]
                raise TargetingError(
                    f"target_modules entry {key!r} matches no module of {type(model).__name__}; "
                    f"nearest module names: {suggest_names(key, names)}"
                )
    if not hits:
        raise TargetingError(
            f"target_modules={_shown(spec)} matches no module of {type(model).__name__}; "
            f"nearest module names: {suggest_names(str(spec), names)}"
        )
    excluded = []
    if config.exclude_modules:
        excluded = [n for n, _ in hits if name_matches(n, config.exclude_modules)]
        hits = [(n, m) for n, m in hits if n not in excluded]
    skipped = []
    if config.layers_to_transform is not None:
        keep = set(config.layers_to_transform)
        skipped = [n for n, _ in hits if _layer_index(n, config.layers_pattern) not in keep]
        hits = [(n, m) for n, m in hits if n not in skipped]
    refused = [n for n, _ in hits if n in uncalled]
    if refused:
        raise TargetingError(
            f"{refused[0]!r} cannot be adapted: {uncalled[refused[0]]}; target_modules={_shown(spec)} selects it. "
            "Leave it out (all-linear does), e.g. with exclude_modules"
        )
    foreign = [(n, m) for n, m in hits if isinstance(m, AdapterLayer) and not is_wrapped(m)]
    if foreign:
        n, m = foreign[0]
        raise TargetingError(
            f"{n!r} is already wrapped by {type(m).__name__} (adapters {m.adapter_names}); one method per layer. "
            "Leave it out of target_modules, or eject the other method first. Different methods on different "
            "layers of one model work together."
        )
    bad = [(n, m) for n, m in hits if not (can_wrap(m) or is_wrapped(m))]
    if bad:
        n, m = bad[0]
        raise TargetingError(
            f"target_modules={_shown(spec)} selects {n!r} of type {type(m).__name__}, which this method cannot wrap "
            f"({len(bad)} such module(s)); it supports {supported}. Narrow target_modules to those layers."
        )
    if not hits:
        raise TargetingError(
            f"target_modules={_shown(spec)} matched modules, but exclude_modules / layers_to_transform removed all of them"
        )
    left_out = {n: uncalled[n] for n, m in named if all_linear and n in uncalled and is_linear_like(m)}
    return TargetPreview({n: type(m).__name__ for n, m in hits}, excluded, skipped, left_out)
