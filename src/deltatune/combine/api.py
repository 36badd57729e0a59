"""combine_adapters and convert_adapter: several adapters, or one of any mergeable method, in, one plain LoRA
adapter folder out, with the error of every approximation measured and recorded in its deltatune.json."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import CombineError
from ..core.inject import eject
from .arithmetic import check_parameters, combine_module
from .build import SIDE_FILE, Source, in_model_order, inject_factors, logit_error, read_source, write_result
from .deltas import ModuleDelta
from .lowrank import Factors, exact, truncate
from .options import DENSITY_METHODS, MODULES_TO_SAVE_CHOICES


@dataclass
class CombineReport:
    path: Path
    method: str
    rank: int  # the written adapter's `r` (its most common rank)
    ranks: dict[str, int]  # per module
    relative_errors: dict[str, float]  # per module, ||ΔW - B A||_F / ||ΔW||_F
    logits: dict[str, Any] | None  # logit_error's numbers; None when no sample could be made

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "method": self.method, "rank": self.rank,
            "max_relative_error": self.max_relative_error, "logits": self.logits,
        }  # fmt: skip


def combine_adapters(
    model: nn.Module,
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    energy: float | None = None,
    density: float = 0.5,
    sign_rule: str = "total",
    seed: int = 0,
    sample: Any = None,
    check_logits: bool = True,
    tokenizer: Any = None,
    allow_base_mismatch: bool = False,
) -> CombineReport:
    """Combine the adapters saved at `adapters` (all for the bare base `model`) into one LoRA adapter at `out`.

    Every method acts on each module's exact ΔW_i (see combine.arithmetic); `weights` default to 1 each.
    `cat` is exact at rank Σ r_i; the others are factored by truncated SVD at `rank` (default: the largest
    source rank) or at the smallest rank keeping `energy` of each module's squared singular values.
    `density` and `seed` are used by ties / dare / magnitude_prune only. The logit error against the exact
    combination is measured on `sample` (input_ids or a dict of inputs; default random token ids);
    `check_logits=False` skips it, and with it holding every module's exact delta until the end.
    """
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(adapters) < 2:
        raise CombineError(
            f"combining needs at least two adapters, got {len(adapters)}; to rewrite one, convert"
        )
    if len(weights) != len(adapters):
        raise CombineError(
            f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter"
        )
    check_parameters(method, weights, density, sign_rule)
    if method == "cat" and (rank is not None or energy is not None):
        raise CombineError("cat is exact at rank Σ r_i and takes no rank or energy; use linear to truncate")
    sources = [
        read_source(model, a, allow_base_mismatch=allow_base_mismatch, tokenizer=tokenizer) for a in adapters
    ]
    _check_sources(sources)
    if method != "cat" and rank is None and energy is None:
        rank = _default_rank(sources)
    generator = torch.Generator().manual_seed(seed)
    names = in_model_order(model, set().union(*(s.deltas for s in sources)))
    # held for the logit check (dense for ties/dare); without it, memory stays at one module's delta
    exact_deltas: dict[str, ModuleDelta] | None = {} if check_logits else None
    factors = {}
    for name in names:
        combined = combine_module(
            [s.deltas.get(name) for s in sources], weights, method,
            density=density, sign_rule=sign_rule, generator=generator,
        )  # fmt: skip
        if exact_deltas is not None:
            exact_deltas[name] = combined
        factors[name] = exact(combined) if method == "cat" else truncate(combined, rank, energy)
    parameters = {"weights": weights, "rank": rank, "energy": energy}
    if method in DENSITY_METHODS:
        parameters.update(density=density, seed=seed)
    if method in ("ties", "dare_ties"):
        parameters["sign_rule"] = sign_rule
    return _finish(
        model, sources, out, method, parameters, factors, exact_deltas, sample, tokenizer, None
    )  # fmt: skip


def convert_adapter(
    model: nn.Module,
    adapter: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    modules_to_save: str = "refuse",
    sample: Any = None,
    check_logits: bool = True,
    tokenizer: Any = None,
    allow_base_mismatch: bool = False,
) -> CombineReport:
    """Rewrite one adapter with an exact ΔW (LoRA with rsLoRA / DoRA / alpha_pattern / rank_pattern, IA3, a
    linear bottleneck, LoRA on a quantized base) as a plain LoRA with one lora_alpha, at `rank` or at
    `energy` (see combine_adapters). A plain LoRA given neither keeps its own factors, exactly.

    `modules_to_save`: "refuse" (the default) errors on an adapter with trained full copies of modules, which
    engines such as vLLM reject; "split" writes those copies to modules_to_save.safetensors beside the
    adapter, keyed as in the base model's state dict, and leaves them out of the LoRA.
    """
    if modules_to_save not in MODULES_TO_SAVE_CHOICES:
        raise CombineError(
            f"modules_to_save={modules_to_save!r}; choose one of {list(MODULES_TO_SAVE_CHOICES)}"
        )
    source = read_source(model, adapter, allow_base_mismatch=allow_base_mismatch, tokenizer=tokenizer)
    if source.modules_to_save and modules_to_save == "refuse":
        raise CombineError(
            f"{source.folder} carries full trained copies of {sorted(source.modules_to_save)} "
            "(modules_to_save), which a plain LoRA cannot hold and engines such as vLLM refuse; "
            f"convert with modules_to_save='split' (--modules-to-save split) to write them to {SIDE_FILE}"
        )
    factors = plain_factors(source, rank, energy)
    return _finish(
        model, [source], out, "convert", {"rank": rank, "energy": energy}, factors,
        source.deltas if check_logits else None, sample, tokenizer, source.modules_to_save or None,
    )  # fmt: skip


def plain_factors(source: Source, rank: int | None, energy: float | None) -> dict[str, Factors]:
    """Each module's LoRA factors at `rank` or `energy`; with neither, a plain LoRA's own factors (exact)."""
    keep_own = rank is None and energy is None
    if keep_own and not all(d.low_rank for d in source.deltas.values()):
        raise CombineError(
            f"{source.folder} ({_method_label(source)}) has dense deltas; give a rank or an energy threshold"
        )
    return {name: exact(d) if keep_own else truncate(d, rank, energy) for name, d in source.deltas.items()}


def _method_label(source: Source) -> str:
    if getattr(source.config, "use_dora", False):
        return "DoRA"
    return source.config.peft_type


def _check_sources(sources: list[Source]) -> None:
    for source in sources:
        if source.modules_to_save:
            raise CombineError(
                f"{source.folder} carries full trained copies of {sorted(source.modules_to_save)} "
                "(modules_to_save); full copies are not deltas and are not combined. Convert it with "
                "modules_to_save='split' first and combine the LoRA part"
            )
    task_types = {s.config.task_type for s in sources}
    if len(task_types) > 1:
        raise CombineError(f"the adapters were trained for different tasks ({sorted(map(str, task_types))})")
    shapes: dict[str, tuple[int, int]] = {}
    for source in sources:
        for name, delta in source.deltas.items():
            if shapes.setdefault(name, delta.shape) != delta.shape:
                raise CombineError(f"{name}: the adapters' deltas have different shapes")


def _default_rank(sources: list[Source]) -> int:
    ranks = [s.rank for s in sources if s.rank is not None]
    if not ranks:
        raise CombineError(
            "no source is a LoRA with a rank to default to; give a rank or an energy threshold"
        )
    return max(ranks)


def _finish(
    model: nn.Module,
    sources: list[Source],
    out: str | Path,
    method: str,
    parameters: dict[str, Any],
    factors: dict[str, Factors],
    exact_deltas: dict[str, ModuleDelta] | None,
    sample: Any,
    tokenizer: Any,
    side_state: dict[str, torch.Tensor] | None,
) -> CombineReport:
    """Put the result into the model, measure it, write it; the model is bare again afterwards."""
    config = inject_factors(model, factors, sources[0].config)
    try:
        logits = logit_error(model, exact_deltas, sample) if exact_deltas is not None else None
        report = CombineReport(
            path=Path(out), method=method, rank=config.r,
            ranks={n: f.rank for n, f in factors.items()},
            relative_errors={n: f.relative_error for n, f in factors.items()}, logits=logits,
        )  # fmt: skip
        derived_from = {
            "method": method, "parameters": parameters, "sources": [s.describe() for s in sources],
            "max_relative_error": report.max_relative_error,
            "relative_errors": report.relative_errors,
            "energy_kept": {n: f.energy_kept for n, f in factors.items()},
            "logits": logits,
            "modules_to_save_file": SIDE_FILE if side_state else None,
        }  # fmt: skip
        write_result(model, out, tokenizer=tokenizer, derived_from=derived_from, side_state=side_state)
    finally:
        eject(model, merge=False)
    return report
