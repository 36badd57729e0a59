"""Multi-adapter inference on one frozen base: an adapter cache, mixed-adapter batches, batched generation."""

from .cache import AdapterCache, AdapterNameInvalid, CachedAdapter, CacheFullError
from .generate import Completion, generate
from .mixed import MixedBatchError, mixable_refusal, mixed_adapters, release_workspace

__all__ = [
    "AdapterCache",
    "AdapterNameInvalid",
    "CacheFullError",
    "CachedAdapter",
    "Completion",
    "MixedBatchError",
    "generate",
    "mixable_refusal",
    "mixed_adapters",
    "release_workspace",
]
