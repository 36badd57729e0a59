"""Where an adapter came from: a fingerprint of its base model, the environment, and hashes of inputs.

The fingerprint is what lets `load_adapter` refuse a different base model: architecture, the shapes of all
base parameters, and a hash of the exact bytes of the weights the adapter modifies (hashed by each wrapper before any merge).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from importlib import metadata
from typing import Any

from torch import nn

from .quantized import logical_shape, storage_dtype
from .state import plain_state_dict

SCHEMA_VERSION = 1


def schema_problem(version: Any) -> str | None:
    """Why a deltatune.json with this `schema_version` is not one this deltatune reads (None: it is). Full
    fine-tunes' records carried none before 2026-11-30; every adapter's has."""
    if version is None:
        return "has no schema_version: it was written before deltatune recorded one, or edited by hand"
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return f"has schema_version {version!r}, which is not a version number"
    if version > SCHEMA_VERSION:
        return (
            f"has schema_version {version}, newer than this deltatune reads ({SCHEMA_VERSION}); upgrade deltatune "
            "to load it"
        )
    return None


def architecture(model: nn.Module) -> str:
    """The model's class name. FSDP2's `fully_shard` swaps in a subclass named "FSDP<class>"; the architecture
    is the class it wraps, so an adapter trained under FSDP loads into the plain model."""
    import torch.distributed

    if not torch.distributed.is_available():  # builds without distributed support have no FSDP
        return type(model).__name__
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def base_fingerprint(model: nn.Module, target_names: list[str]) -> dict[str, Any]:
    """Identify the base model an adapter was (or is about to be) attached to."""
    plain = plain_state_dict(model)
    shapes = sorted((k, tuple(v.shape)) for k, v in plain.items())
    config = getattr(model, "config", None)
    names = sorted(target_names)
    layers = [model.get_submodule(n) for n in names]
    digests = "".join(f"{n}:{layer.base_digest()}\n" for n, layer in zip(names, layers, strict=True))
    return {
        "architecture": architecture(model),
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_parameters": sum(v.numel() for v in plain.values()),
        "shapes_sha256": hashlib.sha256(repr(shapes).encode()).hexdigest(),
        "targets": {
            n: {
                "shape": logical_shape(layer.base_layer)
                if layer.quantized
                else list(layer.base_weight.shape),
                "dtype": storage_dtype(layer.base_layer)
                if layer.quantized
                else str(layer.base_weight.dtype).removeprefix("torch."),
            }
            for n, layer in zip(names, layers, strict=True)
        },
        "target_weights_sha256": hashlib.sha256(digests.encode()).hexdigest(),
    }


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Return (problems, warnings): problems mean a different base model, warnings an expected difference."""
    problems, warnings = [], []
    if saved.get("architecture") != current.get("architecture"):
        problems.append(
            f"architecture {saved.get('architecture')} (adapter) vs {current.get('architecture')} (model)"
        )
    s_t, c_t = saved.get("targets", {}), current.get("targets", {})
    for name in sorted(set(s_t) | set(c_t)):
        if name not in c_t or name not in s_t:
            where = "the model" if name not in c_t else "the adapter's base"
            problems.append(f"module {name} missing from {where}")
        elif s_t[name]["shape"] != c_t[name]["shape"]:
            problems.append(
                f"{name}.weight shape {s_t[name]['shape']} (adapter) vs {c_t[name]['shape']} (model)"
            )
    if problems:
        return problems, warnings
    dtypes = {(s_t[n]["dtype"], c_t[n]["dtype"]) for n in s_t if s_t[n]["dtype"] != c_t[n]["dtype"]}
    if dtypes:
        warnings.append(
            f"base weights are stored as {sorted(dtypes)[0][1]} here but were {sorted(dtypes)[0][0]} when the "
            "adapter was saved; the exact-weights check is skipped and outputs will differ slightly"
        )
    elif saved.get("target_weights_sha256") != current.get("target_weights_sha256"):
        problems.append(
            "the targeted base weights differ (sha256 "
            f"{str(saved.get('target_weights_sha256'))[:12]}... vs {str(current.get('target_weights_sha256'))[:12]}...)"
        )
    return problems, warnings


def environment() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("deltatune", "torch", "transformers", "safetensors", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the tokenizer's full serialisation (vocab, merges, special tokens) where available."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    if backend.truncation is not None or backend.padding is not None:
        # Call-time state, not the tokenizer: a call with truncation=True leaves it set on the backend (the
        # classification data path does), and hashing it made a saved classifier refuse a fresh tokenizer.
        backend = type(backend).from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def record(**fields: Any) -> dict[str, Any]:
    """A deltatune.json record: the schema version, when and where it was made, then `fields`. Every
    folder deltatune writes (adapter, merged or fully fine-tuned model) starts from this."""
    return {"schema_version": SCHEMA_VERSION, "created_at": now_utc(), "environment": environment(), **fields}


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
