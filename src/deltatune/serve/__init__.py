"""`deltatune serve`: one frozen base, the adapters of one directory, OpenAI-style HTTP endpoints.

Needs the `serve` extra (FastAPI and uvicorn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runtime.prefix_cache import DEFAULT_BUDGET_BYTES
from .app import Limits, create_app
from .engine import Engine


def build_server(
    base: str,
    adapters_dir: str | Path,
    *,
    base_name: str | None = None,
    api_key: str | None = None,
    cache_bytes: int | None = 1 << 30,
    max_batch: int = 16,
    batch_window_s: float = 0.01,
    continuous: bool = True,
    prompt_tokens_per_round: int = 512,
    prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES,
    limits: Limits | None = None,
    preload: list[str] | None = None,
    allow_base_mismatch: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    quantize: str | None = None,
) -> tuple[Any, Engine]:
    """Load the base model and tokenizer, and return (FastAPI app, engine). `device`: auto (a GPU when torch
    sees one), cpu, cuda, cuda:N; adapters load onto it, and every batch runs there. `dtype`: the base's
    (float32, bfloat16, float16; adapters keep their own, float32 on a half-precision base). `quantize`:
    int8 or int4 packs the base's linear layers for torch's CPU kernels (runtime.weight_only)."""
    from ..runtime import AdapterCache

    directory = Path(adapters_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapters directory {directory} does not exist; create it or pass another")
    model, tokenizer = load_base(base, device, dtype, quantize)
    cache = AdapterCache(
        model,
        directory,
        budget_bytes=cache_bytes,
        tokenizer=tokenizer,
        allow_base_mismatch=allow_base_mismatch,
    )
    for name in preload or []:
        cache.load(name)
    engine = Engine(
        model,
        tokenizer,
        cache,
        max_batch=max_batch,
        batch_window_s=batch_window_s,
        continuous=continuous,
        prompt_tokens_per_round=prompt_tokens_per_round,
        prefix_cache_bytes=prefix_cache_bytes,
    )
    app = create_app(engine, base_name=base_name or Path(str(base)).name, api_key=api_key, limits=limits)
    return app, engine


def load_base(
    base: str, device: str = "auto", dtype: str = "float32", quantize: str | None = None
) -> tuple[Any, Any]:
    """The frozen base a server answers with (in `dtype`, in eval mode, on `device`, packed as `quantize`
    says) and its tokenizer."""
    from ..models.loading import load_tokenizer_from
    from ..runtime.inference_model import load_inference_model

    model = load_inference_model(base, device, dtype, quantize)
    return model, load_tokenizer_from(base)


__all__ = ["Engine", "Limits", "build_server", "create_app", "load_base"]
