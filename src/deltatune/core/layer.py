"""AdapterLayer: a wrapper that keeps the original module as `base_layer` and adds named adapters.

The wrapper never modifies `base_layer` except inside an explicit `merge()`, and `unmerge()` undoes it.
Merge state is tracked per adapter so that merging twice is a no-op and unmerge only touches what merge did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .capabilities import Capability, capability_refusal
from .config import AdapterConfig
from .errors import AdapterFormatError, AdapterNameError, MergeError
from .hashing import tensor_sha256
from .quantized import float_weight, is_quantized

_WEIGHTS_FOLLOW: ContextVar[bool] = ContextVar("deltatune_weights_follow", default=False)


@contextmanager
def weights_follow() -> Iterator[None]:
    """Adapters created inside the block may skip random initialisation: a loader is about to overwrite
    every tensor (and checks that it did). Initialising ~20 MB of LoRA factors costs more than loading them."""
    token = _WEIGHTS_FOLLOW.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FOLLOW.reset(token)


def initialization_skipped() -> bool:
    return _WEIGHTS_FOLLOW.get()


class AdapterLayer(nn.Module):
    """Base class of method wrappers. Subclasses implement the adapter math; this class owns the bookkeeping."""

    # Attribute names that hold adapter parameters (ModuleDict / ParameterDict keyed by adapter name).
    adapter_attributes: tuple[str, ...] = ()
    # True when the on-disk keys are model-level (PEFT's "prompt_embeddings"), not prefixed by the module path.
    global_state_keys: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # A quantized base is stored packed: math on its weight goes through base_weight_float().
        self.quantized = is_quantized(base_layer)
        self.adapter_configs: dict[str, AdapterConfig] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False
        self._base_digest: str | None = None

    def base_digest(self) -> str:
        """Hash of the pristine base weight, taken before any merge (merge/unmerge round trips are not
        bit-exact in floating point, so the fingerprint must not depend on them)."""
        if self._base_digest is None:
            self._base_digest = tensor_sha256(self.base_weight)
        return self._base_digest

    # ---- adapters ---------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    def add_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        if name in self.adapter_configs:
            raise AdapterNameError(
                f"{module_name}: adapter {name!r} already exists; delete it or pick a new name"
            )
        self.adapter_configs[name] = config
        self.create_adapter(name, config, module_name)

    def create_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(
                f"adapter {name!r} is merged into the base weights; unmerge() before deleting it"
            )
        for attr in self.adapter_attributes:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.adapter_configs.pop(name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def reconfigure(self, name: str, config: AdapterConfig, module_name: str) -> None:
        """Adopt `config` for adapter `name`, whose tensors were just overwritten in place by another saved
        adapter of the same shapes (hot-swap). Layers keeping per-adapter settings outside their tensors
        (LoRA's scaling) override this."""
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be overwritten in place")

    def set_active(self, names: Iterable[str]) -> None:
        names = tuple(n for n in names if n in self.adapter_configs)
        if self.merged_adapters and set(self.merged_adapters) - set(names):
            raise MergeError(
                f"adapters {self.merged_adapters} are merged; unmerge() before switching to {list(names)}"
            )
        self.active_adapters = names

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        # Called per layer and adapter by set_adapter and freezing, hence the direct dict lookups: with many
        # adapters loaded, Module.__getattr__ and parameters() dominated activating one of them.
        for attr in self.adapter_attributes:
            container = self._modules.get(attr)
            if container is None:
                container = getattr(self, attr)
            item = container._modules.get(name) if isinstance(container, nn.ModuleDict) else None
            if item is None:
                if name not in container:
                    continue
                item = container[name]
            if isinstance(item, nn.Parameter):
                yield item
            elif item._modules:
                yield from item.parameters()
            else:
                yield from (p for p in item._parameters.values() if p is not None)

    @property
    def unmerged_active(self) -> tuple[str, ...]:
        """Adapters whose update the forward must still compute."""
        if self.adapters_disabled:
            return ()
        if not self.merged_adapters:
            return self.active_adapters
        return tuple(a for a in self.active_adapters if a not in self.merged_adapters)

    # ---- on-disk state (keys local to this layer, in PEFT's naming) ------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    @staticmethod
    def copy_checked(
        own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str, hint: str = ""
    ) -> None:
        """Copy `state` into the adapter tensors `own` after checking keys and shapes, naming what differs."""
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise AdapterFormatError(f"{where}: missing keys {missing}, unexpected keys {unexpected}{hint}")
        for key, target in own.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise AdapterFormatError(
                    f"{where}.{key}: shape {tuple(state[key].shape)} in the file, {tuple(target.shape)} expected by "
                    "the model. A rank mismatch means `r`/`rank_pattern` in adapter_config.json disagrees with the "
                    "tensors; other dims mean a different base model."
                )
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(state[key])

    # ---- merging ----------------------------------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with adapter `name` folded in (float32 math, same shape as `weight`)."""
        raise NotImplementedError

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight`."""
        raise NotImplementedError

    def merged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor | None:
        """The bias with adapter `name` folded in, or None when the adapter leaves the bias alone."""
        return None

    def unmerged_bias(self, name: str, bias: torch.Tensor) -> torch.Tensor | None:
        return None

    def merge_refusal(self, name: str) -> str | None:
        """Why adapter `name` cannot be folded into the base weights, or None when it can: what its method
        declares first, then what this layer adds (a quantized base)."""
        config = self.adapter_configs.get(name)
        reason = capability_refusal(config, Capability.MERGE) if config is not None else None
        if reason:
            return reason
        if self.quantized:
            return (
                f"the base weight is stored quantized ({type(self.base_layer).__name__}); folding an update into "
                "it in place would re-quantize it and lose the update. Serve it unmerged, or write a merged "
                "full-precision copy with export_merged (which measures the merge error)"
            )
        return None

    def base_weight_float(self) -> torch.Tensor:
        """The base weight as float32, dequantized when the base is quantized (detached)."""
        return float_weight(self.base_layer)

    def merge(self, names: Iterable[str] | None = None) -> list[str]:
        """Fold adapters into base_layer.weight. Already-merged adapters are skipped; returns those merged now."""
        names = self.active_adapters if names is None else tuple(names)
        for name in names:
            reason = self.merge_refusal(name) if name in self.adapter_configs else None
            if reason:
                raise MergeError(f"adapter {name!r} cannot be merged into the base weights: {reason}")
        if not self.merged_adapters:
            self.base_digest()
        done = []
        for name in names:
            if name in self.merged_adapters:
                continue
            if name not in self.adapter_configs:
                raise AdapterNameError(f"no adapter named {name!r}; this layer has {self.adapter_names}")
            weight = self.base_weight
            new = self.merged_weight(name, weight.detach().float())
            bias = getattr(self.base_layer, "bias", None)
            new_bias = self.merged_bias(name, bias.detach().float()) if bias is not None else None
            with torch.no_grad():
                weight.copy_(new.to(weight.dtype))
                if new_bias is not None:
                    bias.copy_(new_bias.to(bias.dtype))
            self.merged_adapters.append(name)
            done.append(name)
        return done

    def unmerge(self) -> list[str]:
        """Undo every merge, last merged first. Returns the names unmerged."""
        undone = []
        weight = self.base_weight
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            bias = getattr(self.base_layer, "bias", None)
            new_bias = self.unmerged_bias(name, bias.detach().float()) if bias is not None else None
            with torch.no_grad():
                weight.copy_(self.unmerged_weight(name, weight.detach().float()).to(weight.dtype))
                if new_bias is not None:
                    bias.copy_(new_bias.to(bias.dtype))
            self.merged_adapters.pop()
            undone.append(name)
        return undone

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={list(self.active_adapters)}, merged={self.merged_adapters}"

    def __getattr__(self, name: str):
        """What the wrapper lacks, the wrapped layer answers (`weight`, `bias`, `in_features`, ...): models read
        those of the layer they built (T5's feed-forward casts to `self.wo.weight.dtype`), and must keep working
        once it is wrapped. Called only after normal lookup failed, so the wrapper's own state comes first."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base_layer") if name != "base_layer" else None
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module and one trainable copy per adapter (PEFT's `modules_to_save`).

    On disk the copy's parameters appear under the original module's name, as PEFT writes them.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.adapters_disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        import copy

        copied = copy.deepcopy(self.original_module)
        for p in copied.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copied

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def set_active(self, names: Iterable[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise AdapterNameError(f"modules_to_save copies cannot be combined; activate one of {present}")
        self.active_adapters = tuple(present)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def current(self) -> nn.Module:
        if self.adapters_disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict()) if name in self.modules_to_save else {}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self.modules_to_save[name].load_state_dict(state, strict=True)

    def __getattr__(self, name: str):
        # Callers such as transformers read attributes (e.g. `.weight`, `.out_features`) of the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original_module, name)


def modules_outside_adapters(
    model: nn.Module, dedupe: bool = True, stop_at: Callable[[nn.Module], bool] | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the adapter containers inside wrappers. A wrapper holds two small modules per
    LoRA adapter and layer, so with many adapters loaded those would dominate every walk; wrappers are never
    nested inside them. Modules below the root for which `stop_at` is true are yielded but not entered."""
    stack, seen = [("", model)], set()
    while stack:
        name, module = stack.pop()
        if dedupe and id(module) in seen:  # reported once, as named_modules does (state_dict does not)
            continue
        seen.add(id(module))
        yield name, module
        if name and stop_at is not None and stop_at(module):
            continue
        if isinstance(module, AdapterLayer):
            children = [("base_layer", module.base_layer)]
        else:
            children = list(module._modules.items())
        prefix = f"{name}." if name else ""
        stack.extend(
            (prefix + child_name, child) for child_name, child in reversed(children) if child is not None
        )
