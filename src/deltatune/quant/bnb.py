"""quantize_base: replace a model's frozen nn.Linear layers by bitsandbytes 4-bit / 8-bit layers, in place.

Each layer is quantized from its own weight and the float weight is dropped right away (the new layer is built
on the meta device first), so at no point does the model hold a second full-precision copy.
Skipped by default: the output head (its error lands directly on the logits), classification heads, and
everything that is not an nn.Linear (embeddings, norms).
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapters import adapter_configs
from ..core.errors import DeltatuneError
from ..core.inject import set_child
from ..core.quantized import (
    QUANTIZATION_ATTR,
    quantization_of,
    register_dequantizer,
    register_settings_reader,
)

DEFAULT_SKIP = ("lm_head", "classifier", "score")


class QuantizationError(DeltatuneError, ValueError):
    """A quantization request that cannot be carried out as asked."""


@dataclass(frozen=True)
class QuantizationSettings:
    bits: int
    quant_type: str  # "nf4" | "fp4" for 4 bits, "int8" for 8
    double_quant: bool
    compute_dtype: str
    skipped: tuple[str, ...]
    library: str = "bitsandbytes"
    int8_threshold: float | None = None  # 8 bits: outlier threshold of LLM.int8() (0: pure int8 matmul)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = list(self.skipped)
        return data

    def apply(self, model: nn.Module) -> nn.Module:
        """Quantize float `model` the same way, and mark a transformers model so that `save_pretrained` writes a
        pre-quantized folder `from_pretrained` reloads as bitsandbytes layers."""
        quantize_base(
            model, self.bits, quant_type=self.quant_type if self.bits == 4 else "nf4",
            double_quant=self.double_quant, compute_dtype=getattr(torch, self.compute_dtype),
            skip_modules=list(self.skipped),
        )  # fmt: skip
        if hasattr(model, "config"):
            model.config.quantization_config = self.transformers_config()
        return model

    def transformers_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        if self.bits == 4:
            return BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype), llm_int8_skip_modules=list(self.skipped),
            )  # fmt: skip
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=list(self.skipped)
        )


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizationError(
            "a quantized base needs bitsandbytes: pip install 'deltatune[quant]'"
        ) from exc
    return bitsandbytes


def _skip_names(model: nn.Module, skip_modules: list[str] | None) -> set[str]:
    keys = list(DEFAULT_SKIP) if skip_modules is None else list(skip_modules)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    names = {n for n, m in model.named_modules() if m is head and head is not None}
    names |= {n for n, _ in model.named_modules() if n and any(n == k or n.endswith("." + k) for k in keys)}
    return names


def _quantized_linear(
    linear: nn.Linear,
    weight: torch.Tensor,
    bits: int,
    quant_type: str,
    double_quant: bool,
    dtype: torch.dtype,
) -> nn.Module:
    """A bitsandbytes layer shaped like `linear`, holding `weight` quantized (linear may live on the meta device)."""
    bnb = _bnb()
    device, bias = weight.device, linear.bias
    if bits == 4:
        from .linear4bit import ExactLinear4bit, keep_exact

        new = ExactLinear4bit(
            linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=dtype,
            compress_statistics=double_quant, quant_type=quant_type, device="meta",
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(
            weight.data, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
        ).to(device)
        keep_exact(new)  # no in-place repacking (linear4bit.py)
    else:
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False,
            threshold=0.0, device="meta",
        )  # fmt: skip
        new.weight = bnb.nn.Int8Params(weight.data, requires_grad=False, has_fp16_weights=False).to(device)
    if bias is not None:
        new.bias = nn.Parameter(bias.data, requires_grad=False)
    return new.train(linear.training)  # bitsandbytes' 8-bit matmul takes another path in training mode


def quantize_base(
    model: nn.Module,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: list[str] | None = None,
) -> nn.Module:
    """Quantize `model`'s nn.Linear layers in place (before `inject`); returns the model.

    `skip_modules` (suffixes, as in target_modules) replaces the default skip list; the output head is always
    kept in full precision. Settings are recorded on the model (`quantization_settings`) and in saved adapters.
    """
    check_request(bits, quant_type)
    if adapter_configs(model):
        raise QuantizationError(
            "the model already carries adapters; quantize the base first, then inject (QLoRA trains on top)"
        )
    if quantization_settings(model) is not None:
        raise QuantizationError("the model is already quantized")
    targets, skipped = quantization_targets(model, skip_modules)
    for name in targets:
        linear = model.get_submodule(name)
        new = _quantized_linear(linear, linear.weight, bits, quant_type, double_quant, compute_dtype)
        set_child(model, name, new)
        del linear
    record_settings(model, bits, quant_type, double_quant, compute_dtype, skipped)
    return model


def check_request(bits: int, quant_type: str) -> None:
    if bits not in (4, 8):
        raise QuantizationError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"quant_type must be 'nf4' or 'fp4' for 4 bits, got {quant_type!r}")


def quantization_targets(model: nn.Module, skip_modules: list[str] | None) -> tuple[list[str], set[str]]:
    """The nn.Linear layers to quantize, and the module names kept in full precision."""
    skipped = _skip_names(model, skip_modules)
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skipped]
    if not targets:
        raise QuantizationError("no nn.Linear layer left to quantize after skip_modules")
    return targets, skipped


def record_settings(
    model: nn.Module,
    bits: int,
    quant_type: str,
    double_quant: bool,
    compute_dtype: torch.dtype,
    skipped: set[str],
) -> None:
    settings = QuantizationSettings(
        bits=bits, quant_type=quant_type if bits == 4 else "int8", double_quant=double_quant and bits == 4,
        compute_dtype=str(compute_dtype).removeprefix("torch."), skipped=tuple(sorted(skipped)),
        int8_threshold=0.0 if bits == 8 else None,
    )  # fmt: skip
    object.__setattr__(model, QUANTIZATION_ATTR, settings)


def quantization_settings(model: nn.Module) -> QuantizationSettings | None:
    """How `model` was quantized: by quantize_base, or by transformers from a BitsAndBytesConfig."""
    return quantization_of(model)


def _settings_from_transformers(model: nn.Module) -> QuantizationSettings | None:
    """Settings of a model transformers loaded with a BitsAndBytesConfig (or from a pre-quantized folder)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if data.get("quant_method") != "bitsandbytes":
        return None
    from .linear4bit import make_exact

    make_exact(model)  # deltatune takes charge of the layers it reads settings of
    bits = 4 if data.get("load_in_4bit") else 8
    return QuantizationSettings(
        bits=bits,
        quant_type=data.get("bnb_4bit_quant_type", "nf4") if bits == 4 else "int8",
        double_quant=bits == 4 and bool(data.get("bnb_4bit_use_double_quant")),
        compute_dtype=str(data.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch."),
        skipped=tuple(sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)),
        library="bitsandbytes (loaded by transformers)",
        int8_threshold=float(data.get("llm_int8_threshold", 6.0)) if bits == 8 else None,
    )


def _dequantize_4bit(module: nn.Module) -> torch.Tensor:
    from .linear4bit import decode_4bit, keep_exact, kernel_is_exact

    keep_exact(module)
    weight = module.weight
    if weight.device.type == "cpu" and not kernel_is_exact(weight.quant_state):
        return decode_4bit(module)
    return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)


_KERNEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dequantize_4bit_into(module: nn.Module, out: torch.Tensor) -> bool:
    """bitsandbytes' CPU 4-bit kernel writing into `out`. Its Python op always allocates the result and has no
    CPU `out=` variant, so the kernel is called as that op calls it; False (use the op) where the op itself
    would not use this kernel, or where this bitsandbytes lacks it."""
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    from .linear4bit import block_scales, decode_4bit, keep_exact, kernel_is_exact

    keep_exact(module)
    weight, state = module.weight, module.weight.quant_state
    kernel = getattr(
        lib, f"cdequantize_blockwise_cpu_{state.quant_type}_{_KERNEL_DTYPES.get(out.dtype)}", None
    )
    rows, cols = (int(n) for n in state.shape)
    if kernel is None or state.blocksize >= 2048 or cols % 2 or tuple(out.shape) != (rows, cols):
        return False
    if not kernel_is_exact(state):
        decode_4bit(module, out=out)
        return True
    absmax = block_scales(state).contiguous()
    packed = weight.data.view(torch.uint8).contiguous()
    kernel(
        get_ptr(packed),
        get_ptr(absmax),
        get_ptr(out),
        ctypes.c_longlong(state.blocksize),
        ctypes.c_longlong(rows),
        ctypes.c_longlong(cols),
    )
    return True


def _int8_scale(module: nn.Module) -> torch.Tensor:
    scale = getattr(module.weight, "SCB", None)
    if scale is None:
        scale = module.state.SCB
    return scale.float().unsqueeze(1) / 127.0


def _dequantize_8bit(module: nn.Module) -> torch.Tensor:
    return module.weight.data.float() * _int8_scale(module)


def _dequantize_8bit_into(module: nn.Module, out: torch.Tensor) -> bool:
    torch.mul(module.weight.data, _int8_scale(module), out=out)
    return True


def _register() -> None:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover
        return
    register_dequantizer(bnb.nn.Linear4bit, _dequantize_4bit, _dequantize_4bit_into)
    register_dequantizer(bnb.nn.Linear8bitLt, _dequantize_8bit, _dequantize_8bit_into)
    register_settings_reader(_settings_from_transformers)


_register()
