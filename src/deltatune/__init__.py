"""deltatune: train, save, merge and serve small parameter-efficient deltas on frozen models.

Public API (everything else is internal):
    inject, preview_targets, trainable_summary, save_adapter, load_adapter, set_adapter, delete_adapter,
    disable_adapter, merge, unmerge, eject, export_merged, and the method configs LoraConfig, Ia3Config,
    PromptTuningConfig, PrefixTuningConfig, BottleneckConfig
"""

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
from .core.inject import (
    active_adapters,
    adapter_configs,
    delete_adapter,
    disable_adapter,
    eject,
    inject,
    merge,
    preview_targets,
    set_adapter,
    unmerge,
)
from .core.io import load_adapter, load_config, save_adapter
from .core.registry import register, registered_methods
from .core.summary import TrainableSummary, trainable_summary
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import Ia3Config
from .methods.lora import LoraConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterConfigError", "BottleneckConfig", "AdapterFormatError", "AdapterNameError", "AdapterNotFoundError",
    "BaseModelMismatchError", "DeltatuneError", "Ia3Config", "LoraConfig", "MergeError", "PrefixTuningConfig", "PromptTuningConfig", "TargetingError",
    "TrainableSummary", "UnsafeFormatError", "active_adapters", "adapter_configs", "config_from_dict",
    "delete_adapter", "disable_adapter", "eject", "export_merged", "inject", "load_adapter", "load_config",
    "merge", "merged_state_dict", "preview_targets", "register", "registered_methods", "save_adapter",
    "set_adapter", "trainable_summary", "unmerge",
]  # fmt: skip
