"""What llama.cpp expects of a llama-architecture model, as facts in one place: tensor names (through the
`gguf` package's own name map), the row order of the query and key projections, and the hyperparameters.

transformers' llama applies rotary embeddings to the two halves of each head (rotate-half); llama.cpp's
LLM_ARCH_LLAMA rotates adjacent pairs. A checkpoint converted for llama.cpp therefore has the rows of q_proj
and k_proj (and of any update to them, a LoRA's B included) reordered within each head: row (h, j, i) of the
(heads, 2, head_dim/2) view moves to (h, i, j).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import GgufExportError

ARCHITECTURES = ("LlamaForCausalLM",)


def gguf_module() -> Any:
    """The `gguf` package, or an error that says how to get it."""
    try:
        import gguf
    except ImportError:
        raise GgufExportError(
            "GGUF export needs the `gguf` package: pip install 'deltatune[models]'"
        ) from None
    return gguf


@dataclass(frozen=True)
class LlamaShape:
    blocks: int
    heads: int
    kv_heads: int
    hidden: int
    head_dim: int
    intermediate: int
    context: int
    rms_eps: float
    rope_theta: float
    vocab: int
    tied: bool


def llama_shape(model: Any) -> LlamaShape:
    """The hyperparameters llama.cpp reads, or GgufExportError saying why this model is not one it can run."""
    architecture = type(model).__name__
    if architecture not in ARCHITECTURES:
        raise GgufExportError(
            f"GGUF export writes llama-architecture models ({', '.join(ARCHITECTURES)}); this is {architecture}. "
            "Export it with export_merged (a transformers folder) and convert that with llama.cpp's own tools"
        )
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get(
        "rope_type", "default"
    )
    if rope_type not in (None, "default"):
        raise GgufExportError(
            f"the model uses rope scaling {rope_type!r}, which this exporter does not write yet; only plain rotary "
            "embeddings (rope_type 'default') are supported"
        )
    heads = config.num_attention_heads
    return LlamaShape(
        blocks=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        hidden=config.hidden_size,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
        context=config.max_position_embeddings,
        rms_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)),
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def gguf_name(shape: LlamaShape, hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, by gguf's TensorNameMap."""
    gguf = gguf_module()
    mapped = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, shape.blocks).get_name(
        hf_name, try_suffixes=(".weight", ".bias")
    )
    if mapped is None:
        raise GgufExportError(f"{hf_name} has no llama.cpp tensor name; it cannot be written as GGUF")
    return mapped


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a query or key projection (or of a LoRA B for one) from rotate-half to
    llama.cpp's adjacent-pair rotary layout. `heads`: the heads this projection has (kv heads for keys)."""
    out = weight.shape[0]
    return (
        weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def rotary_heads(shape: LlamaShape, hf_name: str) -> int | None:
    """How many heads a tensor's rows are grouped in when they need `interleave_rotary_rows`, else None."""
    if ".self_attn.q_proj" in hf_name:
        return shape.heads
    if ".self_attn.k_proj" in hf_name:
        return shape.kv_heads
    return None
