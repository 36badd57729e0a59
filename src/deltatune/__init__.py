"""deltatune: train, save, merge and serve small parameter-efficient deltas on frozen models.

Public API (everything else is internal):
    inject, preview_targets, trainable_summary, save_adapter, load_adapter, set_adapter, delete_adapter,
    disable_adapter, merge, unmerge, eject, export_merged, and the method configs LoraConfig, Ia3Config
    (also spelled IA3Config, as PEFT does), PromptTuningConfig, PrefixTuningConfig, BottleneckConfig

Names are imported on first use (PEP 562), so `import deltatune` and `deltatune --help` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("AdapterConfig", "config_from_dict"), ".core.config"),
    **dict.fromkeys(
        (
            "AdapterConfigError",
            "AdapterFormatError",
            "AdapterNameError",
            "AdapterNotFoundError",
            "BaseModelMismatchError",
            "DeltatuneError",
            "MergeError",
            "TargetingError",
            "UnsafeFormatError",
        ),
        ".core.errors",
    ),  # fmt: skip
    **dict.fromkeys(("export_merged", "merged_state_dict"), ".core.export"),
    **dict.fromkeys(
        ("active_adapters", "adapter_configs", "delete_adapter", "disable_adapter", "set_adapter"),
        ".core.adapters",
    ),
    **dict.fromkeys(("eject", "inject", "preview_targets"), ".core.inject"),
    **dict.fromkeys(("merge", "unmerge"), ".core.merging"),  # fmt: skip
    **dict.fromkeys(("load_adapter", "load_config", "save_adapter"), ".core.io"),
    **dict.fromkeys(("register", "registered_methods"), ".core.registry"),
    **dict.fromkeys(("TrainableSummary", "trainable_summary"), ".core.summary"),
    "BottleneckConfig": ".methods.bottleneck",
    "Ia3Config": ".methods.ia3",
    "IA3Config": ".methods.ia3",
    "LoraConfig": ".methods.lora",
    "PrefixTuningConfig": ".methods.prefix_tuning",
    "PromptTuningConfig": ".methods.prompt_tuning",
}

__all__ = [  # the names of _EXPORTS, spelled out for linters (a test checks they agree)
    "AdapterConfig", "AdapterConfigError", "AdapterFormatError", "AdapterNameError", "AdapterNotFoundError",
    "BaseModelMismatchError", "BottleneckConfig", "DeltatuneError", "IA3Config", "Ia3Config", "LoraConfig",
    "MergeError", "PrefixTuningConfig", "PromptTuningConfig", "TargetingError", "TrainableSummary",
    "UnsafeFormatError", "active_adapters", "adapter_configs", "config_from_dict", "delete_adapter",
    "disable_adapter", "eject", "export_merged", "inject", "load_adapter", "load_config", "merge",
    "merged_state_dict", "preview_targets", "register", "registered_methods", "save_adapter", "set_adapter",
    "trainable_summary", "unmerge",
]  # fmt: skip


_SUBPACKAGES = {"classification", "cli", "core", "data", "evaluate", "generation", "methods", "models", "quant", "runtime",
                "serve", "sweep", "train"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # `deltatune.core.layer` after a plain `import deltatune`, as before
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .core.adapters import active_adapters, adapter_configs, delete_adapter, disable_adapter, set_adapter
    from .core.config import AdapterConfig, config_from_dict
    from .core.errors import (
        AdapterConfigError,
        AdapterFormatError,
        AdapterNameError,
        AdapterNotFoundError,
        BaseModelMismatchError,
        DeltatuneError,
        MergeError,
        TargetingError,
        UnsafeFormatError,
    )
    from .core.export import export_merged, merged_state_dict
    from .core.inject import eject, inject, preview_targets
    from .core.io import load_adapter, load_config, save_adapter
    from .core.merging import merge, unmerge
    from .core.registry import register, registered_methods
    from .core.summary import TrainableSummary, trainable_summary
    from .methods.bottleneck import BottleneckConfig
    from .methods.ia3 import IA3Config, Ia3Config
    from .methods.lora import LoraConfig
    from .methods.prefix_tuning import PrefixTuningConfig
    from .methods.prompt_tuning import PromptTuningConfig
