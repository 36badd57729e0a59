"""Load the base a task runs on, as its config's model section says: the tokenizer (with something to pad
with), the model (with a classification head when asked; quantized in place when asked). Training,
evaluation, the transfer matrix and the sweep's trials all load through here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..models.loading import load_pretrained, load_tokenizer_from, new_head_explained, resolve_model_path
from ..models.spec import ModelSpec, QuantSpec

NEW_HEAD_NOTE = "the classification head is new: it starts random and trains in full with the adapter"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(spec: ModelSpec) -> Any:
    tokenizer = load_tokenizer_from(spec.path, spec.trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer of {spec.path} has neither a pad nor an eos token to pad with")
    return tokenizer


def load_model(
    spec: ModelSpec,
    tokenizer: Any,
    label_names: list[str] | None = None,
    quantization: QuantSpec | None = None,
    head_note: str | None = NEW_HEAD_NOTE,
) -> nn.Module:
    """The base model as the config describes it, quantized in place when `quantization` is given.
    `head_note`: what to say about a new classification head (see `new_head_explained`)."""
    if quantization is None:
        return _load_float_model(spec, tokenizer, label_names, head_note)
    from ..core.allocator import return_large_blocks_to_os
    from ..quant import load_quantized, quantization_settings, quantize_base

    return_large_blocks_to_os()  # with the weights small, held heap is much of the peak (measured 0.44 -> 0.32x)
    path = resolve_model_path(spec.path)
    if spec.task != "classification" and _streamable(path):
        # Straight from the float checkpoint into quantized layers: the full-precision model is never resident.
        return load_quantized(
            path,
            **quantization.model_dump(),
            dtype=DTYPES[spec.dtype],
            trust_remote_code=spec.trust_remote_code,
        )
    model = _load_float_model(spec, tokenizer, label_names, head_note)
    already = quantization_settings(model)
    if already is not None:
        raise ConfigError(
            f"model.path {spec.path} is a pre-quantized checkpoint ({already.bits}-bit {already.quant_type}, "
            "bitsandbytes); it trains as it is: remove the quantization section"
        )
    return quantize_base(model, **quantization.model_dump())


def _streamable(path: str) -> bool:
    """A local float safetensors checkpoint, which load_quantized reads tensor by tensor."""
    from ..quant.loading import INDEX_NAME

    folder = Path(path)
    if not (folder / "model.safetensors").is_file() and not (folder / INDEX_NAME).is_file():
        return False
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return "quantization_config" not in config


def _load_float_model(
    spec: ModelSpec, tokenizer: Any, label_names: list[str] | None, head_note: str | None = NEW_HEAD_NOTE
) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype], "trust_remote_code": spec.trust_remote_code}
    if spec.task == "classification":
        assert label_names is not None
        with new_head_explained(head_note):
            model = load_pretrained(
                AutoModelForSequenceClassification,
                spec.path,
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)},
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
    else:
        model = load_pretrained(AutoModelForCausalLM, spec.path, **kwargs)
    if getattr(model, "is_quantized", False):  # a pre-quantized checkpoint
        from ..quant import make_exact

        make_exact(model)
    return model
