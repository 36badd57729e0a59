"""Weight-only int8 / int4 bases for inference on a CPU (`--quantize int8 | int4`): each linear layer's weight
stored packed and multiplied by torch's own CPU kernels (`torch._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`), activations in the model's dtype.

Why torch's kernels and not torchao's configs: torchao 0.18 on this torch has no CPU int4 weight-only path
(its packing formats need CUDA, XPU or the mslk package) and its int8 weight-only tensor dequantizes the whole
weight per call (17.5 ms for SmolLM2's output head at one row, against 0.64 ms for the packed kernel; bench/README
§34). A quantized layer is an `nn.Linear` subclass registered with `core.quantized`, so adapters load onto it,
mixed-adapter batches run on it and merges read its dequantized weight, as for a bitsandbytes (QLoRA) base.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import DeltatuneError, DeltatuneWarning
from ..core.quantized import QUANTIZATION_ATTR, register_dequantizer

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_HALF = (torch.bfloat16, torch.float16)


class WeightQuantizationUnsupported(DeltatuneError, ValueError):
    """A scheme, device or dtype the packed kernels cannot serve here; the message names what would work."""


class PackedLinear(nn.Linear):
    """A frozen linear layer whose weight is stored packed; `compute_dtype`, its scales' dtype, is the dtype its
    kernel multiplies in (an input in another dtype is cast to it, the output cast back). Read off the scales,
    it follows the layer through `.to(dtype)`."""

    # Its forward returns a fresh tensor in the input's dtype: an adapter's lean inference path adds its update
    # into it in place, as it does into F.linear's output (methods.lora.layers.LoraLinear._lean).
    packed_inference = True

    def _init_packed(self, source: nn.Linear, packed: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = nn.Parameter(packed, requires_grad=False)
        bias = source.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != self.compute_dtype:
            flat = flat.to(self.compute_dtype)
        out = self._packed_mm(flat.contiguous())
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, float32, laid out like nn.Linear.weight."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"


class Int8Linear(PackedLinear):
    """int8 weights with one scale per output row (symmetric, absmax / 127): 1 byte a weight."""

    def __init__(self, source: nn.Linear) -> None:
        w = source.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        scales = scales.to(source.weight.dtype)  # rounded first, so the int8 values fit the scale used
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self._init_packed(source, q)
        self.register_buffer("scales", scales)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight, self.scales)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]


class Int4Linear(PackedLinear):
    """int4 weights in groups of `group_size` inputs, each group with a scale and an offset (asymmetric, as
    llama.cpp's q4_1): half a byte a weight plus 4 bytes a group in bf16."""

    def __init__(self, source: nn.Linear, group_size: int) -> None:
        out, inner = source.out_features, source.in_features
        dtype = source.weight.dtype
        groups = source.weight.detach().float().view(out, inner // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(dtype).float()
        # the kernel computes (q - 8) * scale + zero: zero is the group's value at q = 8
        zeros = (low + 8 * scales).to(dtype).float()
        q = torch.round((groups - (zeros - 8 * scales)[..., None]) / scales[..., None]).clamp(0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out, inner).to(torch.int32), 1)
        self._init_packed(source, packed)
        self.group_size = group_size
        # (groups, out, 2): scale and zero of each group of each output row
        self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.weight, self.group_size, self.scales_and_zeros
        )

    def dequantized(self) -> torch.Tensor:
        # the kernel itself dequantizes: the identity through it in float32 is each weight, exactly
        identity = torch.eye(self.in_features)
        columns = torch.ops.aten._weight_int4pack_mm_for_cpu(
            identity, self.weight, self.group_size, self.scales_and_zeros.float()
        )
        return columns.t().contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


register_dequantizer(PackedLinear, lambda module: module.dequantized())


@dataclass
class WeightOnly:
    """How a base was quantized for inference (kept on the model for provenance and `apply`)."""

    scheme: str
    group_size: int | None = None
    head: str | None = None  # the output head's scheme where it differs (int8 under int4)
    left_out: dict[str, str] = field(default_factory=dict)  # layer -> why it stayed in its dtype

    def to_dict(self) -> dict:
        return {
            "backend": "torch-packed",
            "scheme": self.scheme,
            "group_size": self.group_size,
            "head": self.head,
        }

    def apply(self, model: nn.Module) -> WeightOnly:
        return quantize_weights(model, self.scheme, group_size=self.group_size or 32)


def check_scheme(scheme: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse, before a model loads, what the packed kernels cannot run here, naming what would."""
    if scheme not in SCHEMES:
        raise WeightQuantizationUnsupported(
            f"quantization scheme {scheme!r} is not one of {', '.join(SCHEMES)} (weight-only, for inference)"
        )
    if torch.device(device).type != "cpu":
        raise WeightQuantizationUnsupported(
            f"--quantize {scheme} runs torch's packed CPU kernels, and this model is on {device}; on a GPU use "
            "--dtype bfloat16 (or float16), or run on --device cpu"
        )
    if dtype not in _HALF:
        raise WeightQuantizationUnsupported(
            f"--quantize {scheme} multiplies in bfloat16 or float16 (torch's packed kernels at float32 "
            "activations are slower than a float32 base); use --dtype bfloat16, its default"
        )
    if scheme == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise WeightQuantizationUnsupported(
            f"this torch ({torch.__version__}) has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu, "
            "torch >= 2.5); use --quantize int8"
        )


def quantize_weights(model: nn.Module, scheme: str, group_size: int = 32) -> WeightOnly:
    """Replace every nn.Linear of `model` by its packed int8 / int4 form, in place. The output head is packed
    too, in int8 under int4 (as llama.cpp's 4-bit files keep their output tensor finer): on the quickstart's
    evaluation an int4 head cost 6 of 68.5 points of accuracy, an int8 head under int4 0.6 (bench/README §34).
    A layer the scheme cannot pack stays as it is and is named in the result's `left_out` and in one warning.
    The model must be on the CPU, in bfloat16 or float16, without adapters yet."""
    from ..core.layer import AdapterLayer

    weight = next(p for p in model.parameters() if p.is_floating_point())
    check_scheme(scheme, weight.device, weight.dtype)
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise WeightQuantizationUnsupported(
            "this model already has adapters: quantize the base first, then load them onto it (each adapter "
            "layer chose how to compute when it wrapped its base)"
        )
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise WeightQuantizationUnsupported(
            f"int4 group size {group_size} is not one of {', '.join(map(str, INT4_GROUP_SIZES))}"
        )
    settings = WeightOnly(scheme, group_size if scheme == "int4" else None)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear  # (not a subclass with a forward of its own, nor one already packed)
    ]
    find_head = getattr(model, "get_output_embeddings", None)
    head = find_head() if callable(find_head) else None
    for name, module in targets:
        layer_scheme = "int8" if module is head else scheme
        why = _cannot_pack(module, layer_scheme, group_size)
        if why is not None:
            settings.left_out[name] = why
            continue
        if layer_scheme != scheme:
            settings.head = layer_scheme
        packed = Int8Linear(module) if layer_scheme == "int8" else Int4Linear(module, group_size)
        _replace(model, name, packed)
    if settings.left_out:
        shown = ", ".join(f"{n} ({why})" for n, why in list(settings.left_out.items())[:5])
        warnings.warn(
            f"--quantize {scheme}: {len(settings.left_out)} of {len(targets)} linear layers stay in "
            f"{str(weight.dtype).removeprefix('torch.')}: {shown}",
            DeltatuneWarning,
            stacklevel=2,
        )
    object.__setattr__(model, QUANTIZATION_ATTR, settings)
    return settings


def _cannot_pack(module: nn.Linear, scheme: str, group_size: int) -> str | None:
    if module.weight.dtype not in _HALF:
        return f"weight in {str(module.weight.dtype).removeprefix('torch.')}"
    if scheme == "int4" and module.in_features % group_size:
        return f"{module.in_features} inputs are not a multiple of the group size {group_size}"
    if scheme == "int4" and module.out_features % 16:  # the kernel packs outputs in blocks of 16
        return f"{module.out_features} outputs are not a multiple of 16"
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
