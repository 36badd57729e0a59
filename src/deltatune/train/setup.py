"""Build what a run trains: tokenizer, base model (with a classification head when asked), and the delta."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import inject
from ..core.registry import get_method, registered_methods
from ..models.loading import (
    CLASSIFIER_HEADS,
    load_pretrained,
    load_tokenizer_from,
    new_head_explained,
    resolve_model_path,
)
from .config import FULL_FINE_TUNING, AdapterSpec, ConfigError, ModelSpec, QuantSpec

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


def _method_config_class(method: str) -> type[AdapterConfig]:
    try:
        return get_method(method.upper()).config_class
    except Exception:
        known = ", ".join([FULL_FINE_TUNING, *sorted(m.lower() for m in registered_methods())])
        raise ConfigError(
            f"adapter.method={method!r} is not a known method; choose one of: {known}"
        ) from None


def check_adapter_section(spec: AdapterSpec) -> type[AdapterConfig] | None:
    """The adapter section's method exists and every key is one of its fields (the method's config class;
    None for method: full). Needs no model, so `validate_config` runs it before anything is loaded."""
    if spec.full:
        if spec.model_extra:
            raise ConfigError(f"adapter.method=full takes no other keys, got {sorted(spec.model_extra)}")
        return None
    cls = _method_config_class(spec.method)
    allowed = {f.name for f in dataclasses.fields(cls)} - {
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    }
    unknown = sorted(set(spec.model_extra or {}) - allowed)
    if unknown:
        error = ConfigError(
            f"unknown key(s) {unknown} in adapter (method {spec.method}); allowed: {', '.join(sorted(allowed))}"
        )
        error.keys = unknown  # which keys, for a message that names the override that set them
        raise error
    missing = [k for k in cls.required_keys if k not in (spec.model_extra or {})]
    if missing:
        error = ConfigError(
            f"adapter (method {spec.method}) is missing required key(s) {missing}; "
            f"{spec.method} needs {', '.join(cls.required_keys)}"
        )
        error.keys = missing
        raise error
    fields = dict(spec.model_extra or {})
    if str(fields.get("prompt_tuning_init") or "").upper() == "TEXT":
        fields.setdefault("tokenizer_name_or_path", "the base model's")  # build_adapter_config fills it in
    try:  # the method's own value checks (r > 0, ...), which need no model
        cls.from_dict({"peft_type": cls.peft_type, **fields}, source="adapter section")
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith("adapter section") else f"adapter section: {message}"
        ) from None
    return cls


def build_adapter_config(spec: AdapterSpec, task: str, model: nn.Module) -> AdapterConfig:
    """The YAML's adapter section -> the method's own config. Unknown keys are errors here (unlike when reading
    a PEFT file, where they only warn), because in a config the user writes they are typos."""
    cls = check_adapter_section(spec)
    fields = dict(spec.model_extra or {})
    if task == "classification" and fields.get("modules_to_save") is None:
        heads = [h for h in CLASSIFIER_HEADS if isinstance(getattr(model, h, None), nn.Module)]
        fields["modules_to_save"] = heads  # the new head is randomly initialised: it must train in full
    fields.setdefault("task_type", "SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    if str(fields.get("prompt_tuning_init") or "").upper() == "TEXT":  # embedded with the model's tokenizer
        fields.setdefault("tokenizer_name_or_path", getattr(model.config, "_name_or_path", None))
    try:
        return cls.from_dict({"peft_type": cls.peft_type, **fields}, source="adapter section")
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise ConfigError(
            message if message.startswith("adapter section") else f"adapter section: {message}"
        ) from None


def prepare_trainable(model: nn.Module, spec: AdapterSpec, task: str) -> AdapterConfig | None:
    """Full fine-tuning unfreezes everything; any other method injects its delta (which freezes the base)."""
    if spec.full:
        if spec.model_extra:
            raise ConfigError(f"adapter.method=full takes no other keys, got {sorted(spec.model_extra)}")
        for param in model.parameters():
            param.requires_grad_(True)
        return None
    config = build_adapter_config(spec, task, model)
    inject(model, config)
    return config


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: it recomputes through frozen embeddings without the reentrant variant's
    "element 0 of tensors does not require grad" failure, so no input-grad hook is needed."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            f"{type(model).__name__} has no activation/gradient checkpointing switch; gradient checkpointing "
            "is supported for transformers models"
        )
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
