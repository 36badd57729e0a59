"""Which device a command runs on: one rule for every `--device` / `device:` setting."""

from __future__ import annotations

import warnings

import torch

from .errors import DeltatuneWarning


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when torch sees it, else the CPU; a CUDA device asked for without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(name: str, device: torch.device, quantize: str | None = None) -> torch.dtype:
    """The torch dtype a base model answers in (`--dtype`). Half precision halves the bytes each token reads
    and, on a CPU with AVX512-BF16 or AMX, runs matrix products ~2.7x faster (bench/README §30); a CPU without
    those instructions emulates them, slower than float32, which is said (a warning, not a refusal: the
    answers are right, only slow). Under `quantize` the advice differs: the packed kernels need a half dtype."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(INFERENCE_DTYPES)}")
    dtype = INFERENCE_DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32 and not _native_on_cpu(dtype):
        advice = (
            f"--quantize {quantize} still pays for one stream (it reads a fraction of float32's bytes a token), but "
            "batches of many rows decode slower than on a float32 base; for many streams drop --quantize and "
            "use --dtype float32"
            if quantize
            else "use --dtype float32 here"
        )
        warnings.warn(
            f"this CPU has no native {name} matrix instructions ({_needs(dtype)}): torch emulates them, "
            f"slower than float32; {advice}",
            DeltatuneWarning,
            stacklevel=2,
        )
    return dtype


def _native_on_cpu(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def _needs(dtype: torch.dtype) -> str:
    return "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AMX-FP16"
