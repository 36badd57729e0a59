"""The model `generate` and `serve` answer with: loaded frozen in the dtype asked for, on the device asked
for, its linear layers packed by `weight_only` when asked."""

from __future__ import annotations

from typing import Any

from .weight_only import check_scheme, quantize_weights


def load_inference_model(
    name: str, device: Any = "cpu", dtype: str = "float32", quantize: str | None = None
) -> Any:
    """A causal LM to answer with (`generate`, `serve`), frozen and in eval mode: in `dtype` on `device`,
    its linear layers packed to int8 / int4 when `quantize` says so (runtime.weight_only). A scheme this
    device or dtype cannot run is refused before the weights load."""
    from transformers import AutoModelForCausalLM

    from ..core.devices import inference_dtype, resolve_device
    from ..models.loading import load_pretrained

    where = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = inference_dtype(dtype, where, quantize)
    if quantize is not None:
        check_scheme(quantize, where, torch_dtype)
    model = load_pretrained(AutoModelForCausalLM, name, dtype=torch_dtype).to(where).eval()
    model.requires_grad_(False)
    if quantize is not None:
        quantize_weights(model, quantize)
    return model
