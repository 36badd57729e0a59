"""Which parameters an adapter config selects by name (PEFT's `target_parameters`), for weights that live in no
layer of their own: transformers 5 keeps a mixture-of-experts block's experts as fused 3-D parameters
(experts x out x in) of one module, and its router as a bare 2-D weight.

PEFT's rule: an entry selects the parameter whose key "<module name>.<parameter name>" equals it or ends with
"." + it. Parameters of one module are wrapped one inside the other in the order the module registered them,
the first innermost, which is what PEFT's weight-file keys encode (`experts.base_layer.lora_A.weight` for the
first, `experts.lora_A.weight` for the last).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .errors import TargetingError
from .layer import AdapterLayer
from .targeting import candidate_modules, suggest_names


def parameter_owner(module: nn.Module) -> nn.Module:
    """The module that holds the parameters, under any parameter wrappers around it."""
    while isinstance(module, AdapterLayer) and getattr(module, "parameter_name", None):
        module = module.base_layer
    return module


def wrapped_parameters(module: nn.Module) -> list[str]:
    """The parameter names the wrappers around `module` adapt, innermost first."""
    names = []
    while isinstance(module, AdapterLayer) and getattr(module, "parameter_name", None):
        names.append(module.parameter_name)
        module = module.base_layer
    return names[::-1]


def _parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter, nn.Module]]:
    """(owner module name, parameter name, parameter, owner) for every parameter outside adapters; a module
    another method's wrapper holds is left out (its weights are that wrapper's)."""
    for name, module in candidate_modules(model, lambda m: False):
        if isinstance(module, AdapterLayer) and not getattr(module, "parameter_name", None):
            continue
        owner = parameter_owner(module)
        for param_name, param in owner._parameters.items():
            if param is not None:
                yield name, param_name, param, owner


def fused_experts(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Modules holding a mixture of experts as 3-D parameters (a `num_experts` attribute and parameters of
    that many experts): owner name -> those parameter names, in registration order."""
    found: dict[str, list[str]] = {}
    for name, param_name, param, owner in _parameters(model):
        experts = getattr(owner, "num_experts", None)
        if isinstance(experts, int) and param.dim() == 3 and param.shape[0] == experts:
            found.setdefault(name, []).append(param_name)
    return {name: tuple(params) for name, params in found.items()}


def select_parameters(model: nn.Module, entries: list[str]) -> dict[str, tuple[str, ...]]:
    """Owner module name -> the parameters `entries` select there, in registration order. Refuses an entry
    that selects nothing (naming the nearest parameter keys), a parameter that is not 2-D or 3-D, and one
    on the model itself (it has no parent to be wrapped in)."""
    selected: dict[str, list[str]] = {}
    used: set[str] = set()
    keys = []
    for name, param_name, param, _ in _parameters(model):
        key = f"{name}.{param_name}" if name else param_name
        keys.append(key)
        hits = [e for e in entries if key == e or key.endswith("." + e)]
        if not hits:
            continue
        used.update(hits)
        if not name:
            raise TargetingError(
                f"target_parameters entry {hits[0]!r} selects {key!r}, a parameter of the model itself; only a "
                "submodule's parameter can be adapted"
            )
        if param.dim() not in (2, 3):
            raise TargetingError(
                f"target_parameters entry {hits[0]!r} selects {key!r} of shape {tuple(param.shape)}; LoRA adapts "
                "a 2-D weight (out x in) or 3-D fused experts (experts x out x in). Leave it out"
            )
        selected.setdefault(name, []).append(param_name)
    unmatched = [e for e in entries if e not in used]
    if unmatched:
        raise TargetingError(
            f"target_parameters entry {unmatched[0]!r} matches no parameter of {type(model).__name__}; nearest "
            f"parameter names: {suggest_names(unmatched[0], keys)}"
        )
    return {name: tuple(params) for name, params in selected.items()}


def unwrapped_name(name: str) -> str:
    """A nested parameter wrapper's module name ("experts.base_layer") as the module's own ("experts")."""
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    return name


def wrapper_names(owner_name: str, params: tuple[str, ...]) -> dict[str, str]:
    """Where each parameter's wrapper sits once all of `params` are wrapped: the last registered outermost,
    at the owner's own name; each earlier one a `.base_layer` deeper."""
    depth = len(params) - 1
    return {param: owner_name + ".base_layer" * (depth - i) for i, param in enumerate(params)}
