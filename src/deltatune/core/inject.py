"""inject / eject: putting adapters into a model and taking them out.

`inject` resolves targets, wraps each one (`setattr(parent, child, wrapper)`), and freezes everything but the
new adapter; `eject` removes every wrapper (merging first, or not). Switching and merging adapters live in
`core.adapters` and `core.merging`.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import merging, patterns
from .adapters import adapter_configs, all_wrappers, forget_adapters, set_adapter, store_config
from .config import AdapterConfig
from .errors import AdapterNameError, DeltatuneWarning, TargetingError
from .input_hooks import remove_input_hooks
from .layer import AdapterLayer, ModulesToSaveWrapper, modules_outside_adapters
from .param_targets import wrapped_parameters
from .rebuilt_inputs import forget_rebuildable
from .registry import get_method
from .targeting import TargetPreview, candidate_modules, name_matches, suggest_names


def preview_targets(model: nn.Module, config: AdapterConfig) -> TargetPreview:
    """What `inject(model, config)` would wrap, without changing the model."""
    method = get_method(config.peft_type)
    return method.preview(model, method.resolve_config(model, config))


def _check_adapter_name(model: nn.Module, name: str, reserved: set[str]) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterNameError(f"adapter name {name!r} must be a Python identifier (letters, digits, '_')")
    if name in adapter_configs(model):
        raise AdapterNameError(
            f"adapter {name!r} already exists on this model; delete_adapter(model, {name!r}) or use another name"
        )
    parts: set[str] = set()
    for module_name, module in modules_outside_adapters(model):  # path segments and parameter names
        parts.update(module_name.split(".") if module_name else ())
        parts.update(module._parameters)
        parts.update(module._modules)  # a wrapper's own children (lora_A, ...), which the walk skips
    if name in reserved or name in parts:
        raise AdapterNameError(
            f"adapter name {name!r} collides with a parameter or module name in the model (or a reserved name: "
            f"{sorted(reserved)}); state-dict keys would be ambiguous. Pick another name, e.g. {name + '_adapter'!r}"
        )


def set_child(model: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put `new` where the module named `dotted` is (how wrappers go in and come out)."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` described by `config` to `model` in place; make it the active, trainable one."""
    with patterns.match_budget():  # the config's regexes, over every module name, share one time bound
        return _inject(model, config, adapter_name)


def _inject(model: nn.Module, config: AdapterConfig, adapter_name: str) -> nn.Module:
    method = get_method(config.peft_type)
    _check_adapter_name(model, adapter_name, method.reserved_names())
    config = method.resolve_config(model, config)
    preview = method.preview(model, config)
    for other in config.modules_to_save or []:
        if other in preview.targets:
            raise TargetingError(f"{other!r} is both targeted and in modules_to_save; choose one")
    wrappers = []
    for module_name in preview.targets:
        module = model.get_submodule(module_name)
        mode = module.training
        if isinstance(module, AdapterLayer):
            if not isinstance(module, method.layer_class):
                raise TargetingError(
                    f"{module_name!r} already carries a {type(module).__name__}; "
                    f"stacking a {config.peft_type} adapter on it is not supported"
                )
            wrapper = module
        else:
            wrapper = method.wrap(module, module_name)
            set_child(model, module_name, wrapper)
        wrapper.add_adapter(adapter_name, config, module_name)
        # New modules start in training mode; an eval model must not get adapter dropout at inference.
        wrapper.train(mode)
        wrappers.append(wrapper)
    wrappers += _wrap_parameters(model, method, preview.parameters, config, adapter_name)
    method.attach(model, wrappers)
    _wrap_modules_to_save(model, config, adapter_name)
    store_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    return model


def _wrap_parameters(
    model: nn.Module, method, selected: dict[str, tuple[str, ...]], config: AdapterConfig, adapter_name: str
) -> list[AdapterLayer]:
    """One wrapper per selected parameter, nested around the module that holds them in its registration
    order (PEFT's keys encode that nesting); a module's wrappers are shared by every adapter that adapts its
    parameters, which must then adapt the same ones (PEFT's rule, which keeps the keys of each the same)."""
    wrappers = []
    for owner_name, params in selected.items():
        outer = model.get_submodule(owner_name)
        mode = outer.training
        present = wrapped_parameters(outer)
        if present and present != list(params):
            raise TargetingError(
                f"{owner_name!r} already has adapters on its parameters {present}; another adapter on it must adapt "
                f"the same parameters, not {list(params)} (PEFT's rule for target_parameters)"
            )
        if not present:
            for param in params:
                outer = method.wrap_parameter(outer, param)
            set_child(model, owner_name, outer)
        layer = outer
        while getattr(layer, "parameter_name", None):
            layer.add_adapter(adapter_name, config, f"{owner_name}.{layer.parameter_name}")
            layer.train(mode)
            wrappers.append(layer)
            layer = layer.base_layer
    return wrappers


def _wrap_modules_to_save(model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
    if not config.modules_to_save:
        return
    candidates = candidate_modules(model, lambda m: isinstance(m, (AdapterLayer, ModulesToSaveWrapper)))
    keys = list(dict.fromkeys(config.modules_to_save or []))
    found_by_key = {key: [n for n, _ in candidates if name_matches(n, [key])] for key in keys}
    unmatched = [key for key, found in found_by_key.items() if not found]
    if unmatched:
        names = [n for n, _ in candidates]
        message = f"modules_to_save entry {unmatched[0]!r} matches no module; nearest: {suggest_names(unmatched[0], names)}"
        if len(unmatched) == len(keys):
            raise TargetingError(message)
        # PEFT writes alternatives for classification heads (["classifier", "score"]); one of them matching is enough.
        warnings.warn(message + " (ignored: other entries matched)", DeltatuneWarning, stacklevel=4)
    for found in found_by_key.values():
        for name in found:
            module = model.get_submodule(name)
            mode = module.training
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                set_child(model, name, module)
            module.add_adapter(adapter_name)
            module.train(mode)


def eject(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every wrapper. With merge=True the active adapters are folded in first (and modules_to_save
    copies replace their originals); with merge=False the base model comes back unchanged."""
    if merge:
        merging.merge(model)
    else:
        merging.unmerge(model)
    # innermost first: a parameter wrapper inside another is taken out of it before the outer one goes
    for name, wrapper in sorted(all_wrappers(model), key=lambda item: -item[0].count(".")):
        if isinstance(wrapper, AdapterLayer):
            replacement = wrapper.base_layer
        else:
            replacement = wrapper.current() if merge else wrapper.original_module
        set_child(model, name, replacement)
    forget_adapters(model)
    remove_input_hooks(model)
    forget_rebuildable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
