"""LoRA wrappers for linear, embedding and convolution layers.

Two forward paths compute the same function:
- low-rank path (plain nn.Linear, transformers Conv1D, nn.Embedding): base output plus s * B(A x), never
  materialising the full-size delta; the add is fused into one GEMM (`addmm`), so it costs no extra pass over
  the output in forward or backward.
- weight path (convolutions, and subclasses that override `forward`): call the base module's own forward
  with its weight replaced by W + dW. The layer's forward is linear in its weight, so this equals
  base(x) + delta(x) for any padding or preprocessing the subclass does (e.g. static "same" padding).
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...core.errors import AdapterFormatError
from ...core.layer import AdapterLayer, initialization_skipped
from ...core.quantized import quantized_forward, scratch_weight
from .config import LoraConfig
from .dora import along, column_norm, magnitude_scale
from .fused import fused_lora_linear


class _Weight(nn.Module):
    """Holds one tensor as `.weight`, so state-dict keys read `lora_A.<adapter>.weight` as in PEFT."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(tensor)


class _CastFactors(NamedTuple):
    """A frozen adapter's A and B cast to a forward's dtype, and what they were cast from: each source tensor
    with its storage and version counter (every in-place write bumps it: an optimizer step, `copy_`, a load)."""

    a: torch.Tensor
    b: torch.Tensor
    sources: tuple[tuple[torch.Tensor, int, int], ...]

    @staticmethod
    def of(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> _CastFactors:
        return _CastFactors(a.to(dtype), b.to(dtype), (_stamp(a), _stamp(b)))

    def fits(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
        stamp_a, stamp_b = self.sources
        return self.a.dtype == dtype and _unchanged(stamp_a, a) and _unchanged(stamp_b, b)


def _stamp(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    return t, t.data_ptr(), t._version


def _unchanged(stamp: tuple[torch.Tensor, int, int], t: torch.Tensor) -> bool:
    """Whether `t` is the tensor `stamp` was taken of, with the same storage and no write since."""
    held, pointer, version = stamp
    return held is t and pointer == t.data_ptr() and version == t._version


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision and quantized bases get float32 adapters: tiny in size, and they train far more stably.
    if not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


class LoraLayer(AdapterLayer):
    """Shared LoRA bookkeeping. Subclasses define factor shapes, `delta_weight`, and the low-rank forward."""

    adapter_attributes = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    out_axis = 0  # axis of base_layer.weight that indexes output features
    weight_path = True  # subclasses with a low-rank forward set this per instance

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._norm_at_merge: dict[str, torch.Tensor] = {}
        self._cast_factors: dict[str, _CastFactors] = {}  # see LoraLinear._inference_factors

    # ---- factors, per kind ---------------------------------------------------------------------------------
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _store_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[name] = _Weight(a)
        self.lora_B[name] = _Weight(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A laid out like base_layer.weight."""
        raise NotImplementedError

    def magnitude_shape(self, out: int) -> tuple[int, ...]:
        return (out,)

    def _init_factors(self, a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:  # non-identity start: used by tests so equalities cannot pass trivially
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    # ---- adapters ------------------------------------------------------------------------------------------
    def create_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        r = config.rank_for(module_name)
        weight = self.base_weight
        kw = {"dtype": _adapter_dtype(weight), "device": weight.device}
        shape_a, shape_b = self.factor_shapes(r)
        a, b = torch.empty(shape_a, **kw), torch.empty(shape_b, **kw)
        if not initialization_skipped():
            self._init_factors(a, b, config.init_lora_weights, r)
        self._store_factors(name, a, b)
        self.scaling[name] = config.scaling_for(module_name)
        self.dropout[name] = float(config.lora_dropout)
        if config.use_dora:
            with torch.no_grad():
                norm = column_norm(self.base_weight_float() + self.delta_weight(name).float(), self.out_axis)
            shape = self.magnitude_shape(norm.numel())
            self.lora_magnitude_vector[name] = _Weight(norm.to(kw["dtype"]).reshape(shape))

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)
        self._cast_factors.pop(name, None)

    def reconfigure(self, name: str, config: LoraConfig, module_name: str) -> None:
        self.adapter_configs[name] = config
        self.scaling[name] = config.scaling_for(module_name)
        self.dropout[name] = float(config.lora_dropout)

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    # ---- state on disk --------------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.factors(name)
        keys = (
            ("lora_A.weight", "lora_B.weight")
            if name in self.lora_A
            else ("lora_embedding_A", "lora_embedding_B")
        )
        state = {keys[0]: a, keys[1]: b}
        if self.is_dora(name):
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name].weight
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str = "") -> None:
        state = dict(state)
        full = state.pop("base_layer.weight", None)  # PEFT's save_embedding_layers writes the whole matrix
        if full is not None and not torch.equal(
            full.to(self.base_weight.dtype), self.base_weight.detach().cpu()
        ):
            raise AdapterFormatError(
                f"{where}: the file carries its own full base weight (PEFT save_embedding_layers), and it differs "
                "from this model's; load the base model it was trained with (e.g. with the resized vocabulary)"
            )
        hint = " (the file has DoRA magnitudes but the config says use_dora=false, or vice versa)"
        own = self.adapter_state_dict(name)
        self.copy_checked(
            own, state, where, hint if any("magnitude" in k for k in set(own) ^ set(state)) else ""
        )

    # ---- merge ----------------------------------------------------------------------------------------------
    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name).detach().float()
        if not self.is_dora(name):
            return weight + delta
        norm = column_norm(weight + delta, self.out_axis)
        self._norm_at_merge[name] = norm
        magnitude = self.lora_magnitude_vector[name].weight.detach().float().reshape(-1)
        return along(magnitude / norm, weight.dim(), self.out_axis) * (weight + delta)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name).detach().float()
        if not self.is_dora(name):
            return weight - delta
        norm = self._norm_at_merge.pop(name)
        magnitude = self.lora_magnitude_vector[name].weight.detach().float().reshape(-1)
        return weight * along(norm / magnitude, weight.dim(), self.out_axis) - delta

    # ---- forward --------------------------------------------------------------------------------------------
    # (A mixed-adapter batch replaces this forward per instance for its duration: see runtime.mixed.)
    def forward(self, x: torch.Tensor, *args, **kwargs):
        """The base output plus each active, unmerged adapter's update; the base alone when there is none."""
        active = self.unmerged_active
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self.weight_path:
            return self._weight_path_forward(x, active, *args, **kwargs)
        return self._lowrank_forward(x, active)

    def _dropped(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout[name]
        return F.dropout(x, p, training=True) if self.training and p > 0 else x

    def _weight_path_forward(self, x: torch.Tensor, active: tuple[str, ...], *args, **kwargs):
        """base_layer's own forward with weight W + sum of dW: right for any forward linear in its weight."""
        weight = self.base_weight
        effective = weight
        separate = []  # adapters with live dropout need their own pass over the dropped-out input
        for name in active:
            delta = self.delta_weight(name).to(weight.dtype)
            if self.is_dora(name):
                scale = magnitude_scale(self.lora_magnitude_vector[name].weight, weight, delta, self.out_axis)
                scale = along(scale.to(weight.dtype), weight.dim(), self.out_axis)
                effective = effective + (scale - 1) * weight
                delta = scale * delta
            if self.training and self.dropout[name] > 0:
                separate.append((name, delta))
            else:
                effective = effective + delta
        out = functional_call(self.base_layer, {"weight": effective}, (x, *args), kwargs)
        for name, delta in separate:
            dropped = F.dropout(x, self.dropout[name], training=True)
            override = {"weight": delta}
            if getattr(self.base_layer, "bias", None) is not None:
                override["bias"] = None
            out = out + functional_call(self.base_layer, override, (dropped, *args), kwargs)
        return out

    def lowrank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """A x (or the embedding lookup of A) for the low-rank path, shape (..., r)."""
        raise NotImplementedError

    def _lowrank_forward(self, x: torch.Tensor, active: tuple[str, ...]) -> torch.Tensor:
        """base(x) + s B (A x) per adapter, never forming dW. x: (..., in) -> (..., out)."""
        base_out = (
            quantized_forward(self.base_layer, x) if self.quantized else self.base_layer(x)
        )  # (..., out)
        result = base_out
        for name in active:
            h = self.lowrank(self._dropped(x, name), name)  # (..., r)
            if self.is_dora(name):
                result = result + self._dora_update(name, h, base_out).to(result.dtype)
                continue
            # result + s h B^T as one GEMM, in the output's dtype (adapters may be float32 on a half base)
            _, b = self.factors(name)  # (out, r)
            flat = torch.addmm(
                result.reshape(-1, result.shape[-1]),  # (n, out)
                h.reshape(-1, h.shape[-1]).to(result.dtype),  # (n, r)
                b.to(result.dtype).t(),  # (r, out)
                alpha=self.scaling[name],
            )
            result = flat.view(result.shape)
        return result

    def _dora_update(self, name: str, h: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA's change to the base output: (m/|W + dW| - 1) W x + m/|W + dW| s B h, with W x taken from
        base_out (its bias removed). h: (..., r), base_out: (..., out)."""
        _, b = self.factors(name)
        weight = self.base_weight_float() if self.quantized else self.base_weight
        delta = self.delta_weight(name)
        scale = magnitude_scale(  # (out,)
            self.lora_magnitude_vector[name].weight, weight.to(delta.dtype), delta, self.out_axis
        )
        bias = getattr(self.base_layer, "bias", None)
        plain = base_out if bias is None else base_out - bias  # W x
        update = F.linear(h, b.to(h.dtype)) * self.scaling[name]  # (..., out)
        return (scale - 1) * plain + scale * update


def computes_linear(cls: type) -> bool:
    """nn.Linear, or a subclass whose own forward is exactly x W^T + b (transformers' FalconLinear writes it out
    by hand), so the low-rank path, the fused kernel and mixed-adapter batches apply to it as they are."""
    if cls.forward is nn.Linear.forward:
        return True
    falcon = sys.modules.get("transformers.models.falcon.modeling_falcon")
    return falcon is not None and cls.forward is falcon.FalconLinear.forward


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (weight (out, in)) or transformers Conv1D (weight (in, out), `fan_in_fan_out`).

    y = W x + b + s * B (A x);  A: (r, in), B: (out, r);  x: (..., in) -> y: (..., out).
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_axis = 1 if fan_in_fan_out else 0
        w = base_layer.weight
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        )
        if self.quantized:  # packed storage: the logical shape is on the layer
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        plain = computes_linear(type(base_layer))
        if fan_in_fan_out:
            plain = type(base_layer).forward is sys.modules["transformers.pytorch_utils"].Conv1D.forward
        # A quantized layer's own forward is the only way to use its weight: take the low-rank path.
        self.weight_path = not plain and not self.quantized
        # what the lean inference path computes exactly as the general one does: x W^T + b, W (out, in)
        self.plain_linear = type(base_layer).forward is nn.Linear.forward and not self.quantized
        # a packed int8 / int4 inference base (runtime.weight_only): its own kernel, then the same update
        self.packed_base = getattr(base_layer, "packed_inference", False)

    def factor_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def _lowrank_forward(self, x: torch.Tensor, active: tuple[str, ...]) -> torch.Tensor:
        if torch.is_grad_enabled():
            # a training forward: the adapter may have been made trainable after its casts were kept, and a
            # fused optimizer step writes it without bumping its version; cast again when inference resumes
            if self._cast_factors:  # (tested, not cleared, when empty: no side effect for a compiled forward)
                self._cast_factors.clear()
        elif self._lean(active, x):
            return self._inference_forward(x, active[0])
        if not self._fusable(active, x):
            return super()._lowrank_forward(x, active)
        name = active[0]
        x_d = self._dropped(x, name)
        a, b = self.factors(name)
        base = self.base_layer
        if self.quantized:
            return fused_lora_linear(
                x,
                x_d,
                None,
                base.bias,
                a,
                b,
                self.scaling[name],
                False,
                lambda dtype: scratch_weight(base, dtype),
            )
        return fused_lora_linear(
            x, x_d, base.weight, base.bias, a, b, self.scaling[name], self.fan_in_fan_out
        )

    def _lean(self, active: tuple[str, ...], x: torch.Tensor) -> bool:
        """Whether `_inference_forward` computes this call as the general path would: one plain adapter, a base
        weight (a packed base: its compute dtype) in x's dtype and no autocast, on an nn.Linear or a packed
        int8 / int4 layer without hooks, no dropout to apply. (An adapter in another dtype, float32 on a half
        base, is cast to x's as the general path casts it.)"""
        if len(active) != 1 or torch.is_autocast_enabled(x.device.type):
            return False  # (autocast would give the products a dtype of its own)
        if not (self.plain_linear or self.packed_base):
            return False
        name = active[0]
        base = self.base_layer
        return (
            (base.compute_dtype if self.packed_base else base.weight.dtype) == x.dtype
            and not self.is_dora(name)
            and not (self.training and self.dropout[name])
            and not (base._forward_hooks or base._forward_pre_hooks)
        )

    def _inference_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x W^T + b + s (x A^T) B^T as three calls and nothing around them. A decode step runs this in each
        of SmolLM2's 210 adapted layers for every token; the general path's bookkeeping (the base layer's
        module call, dropout, DoRA and dtype checks, reshapes) cost 5% of a token (bench/README §27)."""
        base = self.base_layer
        if self.packed_base:  # a packed base's kernel stays in the graph; the adapter's products beside it
            out = base(x)
        elif _folding_constants():
            # W + s B A is a constant of the frozen graph: folded once, at compile time
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            # in the adapter's dtype, rounded to the base's once: a float32 adapter on a bf16 base keeps its
            # precision up to the sum, and the graph has no products of its own to run (bench/README §30)
            weight = torch.addmm(base.weight.to(a.dtype), b, a, alpha=self.scaling[name]).to(
                base.weight.dtype
            )
            return F.linear(x, weight, base.bias)
        else:
            out = F.linear(x, base.weight, base.bias)
        a, b = self._inference_factors(name, x.dtype)
        h = F.linear(x, a)
        flat = out.view(-1, out.shape[-1])  # a fresh tensor: the update is added in place
        flat.addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=self.scaling[name])
        return out

    def _inference_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `name`'s A and B in `dtype`, rounded as the general path rounds them. A frozen adapter in
        another dtype (float32 on a bf16 base, as loading keeps it) is cast once and the casts kept while its
        factors are the same tensors with the same storage and version: cast per call, they and the general
        path made a 16-row bf16 decode step 1.25x slower (bench/README §32). A trainable adapter is cast per
        call: nothing of a tensor an optimizer steps is kept."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if a.dtype == dtype and b.dtype == dtype:
            return a, b
        if a.requires_grad or b.requires_grad or torch.compiler.is_compiling():
            # (a compiled graph casts its frozen factors once, as constants: nothing to keep, nor can dynamo
            # trace the kept casts' storage checks)
            return a.to(dtype), b.to(dtype)
        held = self._cast_factors.get(name)
        if held is None or not held.fits(a, b, dtype):
            held = self._cast_factors[name] = _CastFactors.of(a, b, dtype)
        return held.a, held.b

    def _fusable(self, active: tuple[str, ...], x: torch.Tensor) -> bool:
        """The fused kernel skips base_layer.__call__ and weight gradients: use it only when that changes
        nothing (one plain LoRA adapter, frozen base, no hooks on the base layer; a quantized base computing
        in x's dtype, as quantized_forward would)."""
        base = self.base_layer
        return (
            torch.is_grad_enabled()  # its gain is in backward; inference is faster through F.linear + addmm
            and len(active) == 1
            and (not self.quantized or getattr(base, "compute_dtype", None) in (None, x.dtype))
            and not self.is_dora(active[0])
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and not (base._forward_hooks or base._forward_pre_hooks)
            # the kernel's output is a view of its result, which autograd forbids modifying in place; Falcon,
            # the one user of a linear-equivalent subclass here, edits its fused qkv output in place
            and (self.quantized or self.fan_in_fan_out or type(base).forward is nn.Linear.forward)
        )

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        delta = (b @ a) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    def lowrank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight
        return F.linear(
            x, a if a.dtype == x.dtype or torch.is_autocast_enabled(x.device.type) else a.to(x.dtype)
        )


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding (weight (num, dim)): y = E[x] + s * (A^T[x]) B^T;  A: (r, num), B: (dim, r)."""

    out_axis = 1

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.weight_path = type(base_layer).forward is not nn.Embedding.forward

    def factor_shapes(self, r: int):
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    def factors(self, name: str):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def create_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        super().create_adapter(name, config, module_name)
        self.dropout[name] = 0.0  # inputs are token ids: there is nothing to drop out (PEFT skips it too)

    def _store_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)

    def _init_factors(self, a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
        # The lookup side starts at zero (so the model is unchanged), the projection random; False: both random.
        nn.init.normal_(a) if init is False else nn.init.zeros_(a)
        nn.init.normal_(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return (b @ a).t() * self.scaling[name]

    def lowrank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.embedding(x, self.lora_embedding_A[name].t())


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d/2d/3d and subclasses: dW = s * B A, A: (r, in, *kernel), B: (out, r, 1, ...).

    A acts like the base convolution (same kernel, stride, padding, dilation) and B as a 1x1 mixing, so
    dW = B.view(out, r) @ A.view(r, -1) has the base weight's shape and the forward uses the weight path.
    """

    out_axis = 0

    def factor_shapes(self, r: int):
        out, cin, *kernel = self.base_layer.weight.shape
        return (r, cin, *kernel), (out, r, *([1] * len(kernel)))

    def magnitude_shape(self, out: int) -> tuple[int, ...]:
        return (1, out, *([1] * (self.base_layer.weight.dim() - 2)))

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        delta = b.flatten(1) @ a.flatten(1)
        return delta.view(self.base_layer.weight.shape) * self.scaling[name]


def _folding_constants() -> bool:
    """Whether this forward is being traced by a compile that freezes the weights into constants
    (`runtime.compiled`): an expression of the weights alone is then computed once, when the graph is built."""
    if not torch.compiler.is_compiling():
        return False
    from torch._inductor import config

    return bool(config.freezing)
