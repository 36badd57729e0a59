"""Export a merged, plain model folder that loads without deltatune, with a measured merge error.

The merge happens on a copy, so the live model (and its adapters) is left as it was. The copy shares every
tensor the merge does not write (embeddings, norms, layers without an adapter) with the live model, so an
export costs the adapted layers' weights in memory, not a second model. On a quantized base the
copy is dequantized first and the update folded in full precision; `requantize=True` then quantizes the merged
weights again with the base's settings. Either way the merged copy is run on a sample next to the live model
and the logit difference is reported, because re-quantizing can silently erase an update smaller than the
quantization step (the failure mode of merging into a 4-bit base).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import adapter_layers, disable_adapter
from .atomic import staged_folder
from .errors import MergeError
from .inject import eject, set_child
from .input_hooks import strip_copied_input_hooks
from .merging import refuse_unmergeable
from .modes import eval_mode
from .quantized import QUANTIZATION_ATTR, dequantized_linear, is_quantized, quantization_of

REPORT_NAME = "merge_report.json"
DEFAULT_SAMPLE_SHAPE = (4, 32)  # random token ids when no sample is given (transformers models)


@dataclass(frozen=True)
class MergeReport:
    """What export_merged wrote, and how far the merged model is from the unmerged adapter on a sample."""

    path: Path
    quantization: dict | None  # the base's quantization; None for a float base
    requantized: bool
    sample: str | None  # what the numbers below were measured on
    max_abs_error: float | None  # |logits(merged) - logits(base + unmerged adapters)|
    mean_abs_error: float | None
    # |logits(base + unmerged adapters) - logits(base alone)|: the scale to read the error against. An error
    # close to this means the merge lost most of what the adapter learned.
    adapter_max_abs_effect: float | None
    adapter_mean_abs_effect: float | None

    @property
    def error_to_effect(self) -> float | None:
        if self.mean_abs_error is None or not self.adapter_mean_abs_effect:
            return None
        return self.mean_abs_error / self.adapter_mean_abs_effect

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"path": str(self.path), "error_to_effect": self.error_to_effect}


def merged_model(model: nn.Module, requantize: bool = False) -> nn.Module:
    """A plain copy of `model` (no wrappers, no hooks) with its active adapters folded in.

    On a quantized base every quantized layer of the copy is dequantized (to the dtype of the input
    embeddings, float32 for non-transformers models) before merging; `requantize` quantizes the merged copy
    again with the base's settings. The live model is not touched. Tensors outside the adapter layers are the
    live model's own storage, under new Parameter objects (see `_copy_sharing_unchanged`): read them freely,
    copy one before writing to it.
    """
    settings = quantization_of(model)
    if requantize and settings is None:
        raise MergeError("requantize=True needs a quantized base; this model's weights are not quantized")
    if settings is None:
        _refuse_unmergeable(model)  # before paying for the copy
    merged = _copy_sharing_unchanged(model)
    strip_copied_input_hooks(merged)
    if settings is not None:
        _dequantize(merged)
        _refuse_unmergeable(merged)  # the methods' own reasons, now that the base is float
    eject(merged, merge=True)
    if requantize:
        settings.apply(merged)
    return merged.eval()


def _copy_sharing_unchanged(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, except that plain tensors outside every adapter layer keep their storage.

    Why: merging writes only the adapter layers' base weights and biases, in place; a full deep copy doubled
    the memory an export needs (a second model, 4.4 GB for a 1.1B float32 base). A shared tensor gets a new
    Parameter object (its storage is the live one's), so the copy's `requires_grad_` or a rebinding never
    reaches the live model; ties stay ties, since one tensor maps to one new Parameter. Quantized or other
    subclassed tensors are deep-copied as before: dequantizing replaces them in the copy.
    """
    written = {id(t) for _, layer in adapter_layers(model) for t in (*layer.parameters(), *layer.buffers())}
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in written or type(tensor.data) is not torch.Tensor:
            continue
        if type(tensor) is nn.Parameter:
            memo[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
        elif type(tensor) is torch.Tensor:
            memo[id(tensor)] = tensor.detach()
    return copy.deepcopy(model, memo)


def _refuse_unmergeable(model: nn.Module) -> None:
    refuse_unmergeable(
        [(name, layer, list(layer.unmerged_active)) for name, layer in adapter_layers(model)],
        "be exported merged",
        "Save it with save_adapter and load it onto the base instead.",
    )


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with the active adapters folded in (dequantized on a quantized base).
    Entries the merge does not change share the live model's storage, as `model.state_dict()`'s do."""
    return merged_model(model).state_dict()


def _dequantize(model: nn.Module) -> None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            set_child(model, name, dequantized_linear(module, dtype))
    for _, layer in adapter_layers(model):
        layer.quantized = False
    model.__dict__.pop(QUANTIZATION_ATTR, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config  # a transformers model loaded quantized: the copy is a float one now
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        # transformers replays the load-time weight conversions backwards on save; the quantizer's own
        # (deserialising packed weights) have no reverse and no longer apply to float weights.
        model._weight_conversions = [c for c in model._weight_conversions or [] if _reversible(c)] or None


def _reversible(conversion: Any) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


def sample_inputs(model: nn.Module, sample: Any) -> tuple[dict[str, Any], str] | None:
    if sample is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            return None
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, DEFAULT_SAMPLE_SHAPE, generator=generator)
        return {"input_ids": ids}, f"random token ids {list(DEFAULT_SAMPLE_SHAPE)} (seed 0)"
    if isinstance(sample, torch.Tensor):
        return {"input_ids": sample}, f"given input_ids {list(sample.shape)}"
    if isinstance(sample, Mapping):
        return dict(sample), f"given inputs {sorted(sample)}"
    raise MergeError(
        f"sample must be an input_ids tensor or a dict of model inputs, got {type(sample).__name__}"
    )


def logits_of(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    out = model(**inputs)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().float().cpu()


@torch.no_grad()
def _measure(model: nn.Module, merged: nn.Module, inputs: dict[str, Any]) -> dict[str, float]:
    with eval_mode(model):
        adapted = logits_of(model, inputs)
        with disable_adapter(model):
            base = logits_of(model, inputs)
    error, effect = (logits_of(merged, inputs) - adapted).abs(), (adapted - base).abs()
    return {
        "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean()),
        "adapter_max_abs_effect": float(effect.max()), "adapter_mean_abs_effect": float(effect.mean()),
    }  # fmt: skip


def export_merged(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any = None,
    *,
    requantize: bool = False,
    sample: torch.Tensor | Mapping[str, Any] | None = None,
    max_error: float | None = None,
) -> MergeReport:
    """Write the model with active adapters merged to `path`, and report the merge error.

    A transformers model becomes a transformers folder (config + safetensors, and the tokenizer if given; with
    `requantize`, a pre-quantized bitsandbytes folder that from_pretrained reloads as such); any other model
    `model.safetensors` with the plain keys. The error is measured on `sample` (input_ids, or a dict of inputs;
    by default random token ids for a transformers model) and written to `merge_report.json` beside the
    weights. With `max_error`, a larger max |logit difference| raises MergeError and nothing is written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MergeError(f"{path} exists and is a file; export_merged writes a folder")
    settings = quantization_of(model)
    is_transformers = hasattr(model, "save_pretrained") and hasattr(model, "config")
    if requantize and not is_transformers:
        raise MergeError(
            "requantize=True writes a pre-quantized transformers folder; this is not a transformers model"
        )
    prepared = sample_inputs(model, sample)
    if prepared is None and (settings is not None or max_error is not None):
        raise MergeError(
            "cannot measure the merge error without inputs: pass sample= (input_ids or a dict of model inputs)"
        )
    merged = merged_model(model, requantize)
    numbers = _measure(model, merged, prepared[0]) if prepared is not None else dict.fromkeys(
        ("max_abs_error", "mean_abs_error", "adapter_max_abs_effect", "adapter_mean_abs_effect")
    )  # fmt: skip
    report = MergeReport(
        path=path, quantization=settings.to_dict() if settings is not None else None, requantized=requantize,
        sample=prepared[1] if prepared is not None else None, **numbers,
    )  # fmt: skip
    if max_error is not None and report.max_abs_error > max_error:
        raise MergeError(
            f"the merged model differs from the unmerged adapter by up to {report.max_abs_error:.4g} in the logits "
            f"(mean {report.mean_abs_error:.4g}; the adapter itself moves them by {report.adapter_mean_abs_effect:.4g}"
            f" on average), above max_error={max_error}; nothing was written."
            + (" Export without requantize=True, or serve the adapter unmerged." if requantize else "")
        )
    with staged_folder(path) as staging:
        if is_transformers:
            merged.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        else:
            _save_plain(merged.state_dict(), staging / "model.safetensors")
        (staging / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _save_plain(state: dict[str, torch.Tensor], file: Path) -> None:
    # safetensors refuses tensors sharing memory; store each once under its own key.
    seen: set[int] = set()
    unique = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        unique[key] = tensor.detach().clone().contiguous() if ptr in seen else tensor.detach().contiguous()
        seen.add(ptr)
    save_file(unique, file, metadata={"format": "pt"})
