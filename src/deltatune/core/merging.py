"""Merging adapters into the base weights and undoing it: explicit, checked before anything changes, and
idempotent (DESIGN.md rule 4). Whether an adapter can merge is its method's declaration plus its layer's
(`AdapterLayer.merge_refusal`)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .adapters import adapter_configs, adapter_layers
from .errors import AdapterNameError, MergeError
from .layer import AdapterLayer


def _check_untied(model: nn.Module, layers: list[tuple[str, AdapterLayer]]) -> None:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, layer in layers:
        shared = owners.get(id(layer.base_weight), [])
        if len(shared) > 1:
            raise MergeError(
                f"{name}.weight is tied to {[s for s in shared if not s.startswith(name + '.')]}; merging would "
                "change those too. Untie the weights first or leave this module out of target_modules."
            )


def merge(
    model: nn.Module, adapter_names: Iterable[str] | None = None, safe_merge: bool = False
) -> list[str]:
    """Fold the active (or named) adapters into the base weights. Idempotent; returns the adapters merged now.
    With safe_merge, every merged weight is computed and checked for NaN/inf before any is written."""
    return _merge(model, None if adapter_names is None else list(adapter_names), safe_merge)


def _merge(model: nn.Module, names: list[str] | None, safe_merge: bool) -> list[str]:
    known = adapter_configs(model)
    for n in names or []:
        if n not in known:
            raise AdapterNameError(f"no adapter named {n!r}; this model has {sorted(known)}")
    layers = list(adapter_layers(model))
    # Each wrapper merges only the requested adapters it carries (adapters may target different modules).
    pending = [
        (
            layer,
            [n for n in (layer.active_adapters if names is None else names) if n in layer.adapter_configs],
        )
        for _, layer in layers
    ]
    refuse_unmergeable(
        [(name, layer, [n for n in todo if n not in layer.merged_adapters])
         for (name, layer), (_, todo) in zip(layers, pending, strict=True)],
        "be merged",
        "Nothing was changed; serve it unmerged, or merge the other adapters by name with merge(model, [names]).",
    )  # fmt: skip
    # Only layers that will change matter: a prompt-tuning wrapper on tied embeddings must not block merging LoRA.
    _check_untied(model, [(n, layer) for (n, layer), (_, todo) in zip(layers, pending, strict=True) if todo])
    if safe_merge:
        for layer, todo in pending:
            for n in todo:
                if n in layer.merged_adapters:
                    continue
                if not layer.merged_weight(n, layer.base_weight.detach().float()).isfinite().all():
                    raise MergeError(
                        f"merging adapter {n!r} gives non-finite weights; nothing was changed. "
                        "The adapter weights are probably corrupted (check for NaN/inf)."
                    )
    merged: set[str] = set()
    for layer, todo in pending:
        merged.update(layer.merge(todo))
    return sorted(merged)


def refuse_unmergeable(pending: list[tuple[str, AdapterLayer, list[str]]], action: str, advice: str) -> None:
    """Raise MergeError for the first (layer name, layer, adapters) entry holding an adapter that cannot merge,
    naming it, the layer and the method's reason; checked before anything is changed."""
    for name, layer, adapters in pending:
        for adapter in adapters:
            reason = layer.merge_refusal(adapter)
            if reason:
                raise MergeError(
                    f"adapter {adapter!r} cannot {action} ({type(layer).__name__} at {name!r}): {reason}. {advice}"
                )


def unmerge(model: nn.Module) -> list[str]:
    undone: set[str] = set()
    for _, layer in adapter_layers(model):
        undone.update(layer.unmerge())
    return sorted(undone)
