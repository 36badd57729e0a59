"""The adapter saved in a folder as a llama.cpp LoRA file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from ..combine.api import plain_factors
from ..combine.build import read_source
from ..core.errors import GgufExportError
from .write import write_gguf_lora


def export_gguf_lora(
    model: nn.Module,
    adapter: str | Path,
    path: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    tensor_type: str = "f32",
    allow_base_mismatch: bool = False,
) -> dict[str, Any]:
    """The adapter saved at `adapter` (for the bare llama `model`) as a llama.cpp LoRA file. A plain LoRA,
    rsLoRA or per-module alpha is written exactly; DoRA, IA3 and linear bottlenecks need `rank` or `energy`
    (their exact ΔW is factored, see combine.convert_adapter), and the report gives the largest relative error."""
    source = read_source(model, adapter, allow_base_mismatch=allow_base_mismatch)
    if source.modules_to_save:
        raise GgufExportError(
            f"{source.folder} carries full trained copies of {sorted(source.modules_to_save)} "
            "(modules_to_save), which a llama.cpp adapter cannot hold; export the model merged instead"
        )
    factors = plain_factors(source, rank, energy)
    alpha = Counter(f.rank for f in factors.values()).most_common(1)[0][0]
    report = write_gguf_lora(
        model, {name: (f.b, f.a) for name, f in factors.items()}, path, alpha=alpha, tensor_type=tensor_type
    )
    report["max_relative_error"] = max(f.relative_error for f in factors.values())
    return report
