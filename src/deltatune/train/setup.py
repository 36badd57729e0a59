"""Build what a run trains: tokenizer, base model (with a classification head when asked), and the delta."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import inject
from ..core.registry import get_method, registered_methods
from .config import AdapterSpec, ConfigError, ModelSpec, QuantSpec

BUNDLED_MODELS = ("smollm2", "minilm")
NEW_HEAD_NOTE = "the classification head is new: it starts random and trains in full with the adapter"
NAMES_THAT_WORK = f"a model folder, a bundled model ({', '.join(BUNDLED_MODELS)}), or a Hugging Face hub id"
CLASSIFIER_HEADS = ("classifier", "score")  # BERT-style and decoder-style sequence classification heads
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """A model name that is no local folder, no bundled model, and not loadable as a hub id."""


def resolve_model_path(name: str) -> str:
    """A bundled name -> its prepared local folder; anything else is passed to from_pretrained unchanged
    (a local folder, or a hub id: the same code path users take online). A name written as a path must
    exist."""
    from ..models.bundled import minilm_path, smollm2_path

    if name == "smollm2":
        return str(smollm2_path())
    if name == "minilm":
        return str(minilm_path())
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path and not Path(name).expanduser().exists():
        raise ModelNotFoundError(f"model folder {name} does not exist; give {NAMES_THAT_WORK}")
    close = difflib.get_close_matches(name, BUNDLED_MODELS, n=1, cutoff=0.7)
    if close and "/" not in name and not Path(name).exists():  # a typo, not a hub id: no slow hub lookup
        raise ModelNotFoundError(
            f"{name!r} is not a bundled model; did you mean {close[0]!r}? Give {NAMES_THAT_WORK}"
        )
    return str(Path(name).expanduser()) if looks_like_path else name


def load_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(name)` with a bundled or mistyped name answered in one clear line instead of
    a transformers traceback about hub repo ids."""
    path = resolve_model_path(name)
    try:
        return loader.from_pretrained(path, **kwargs)
    except (
        OSError
    ) as exc:  # transformers' "not a local folder and not a valid model identifier" (and offline)
        if Path(path).exists():
            raise
        close = difflib.get_close_matches(name, BUNDLED_MODELS, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder or a bundled model, and loading it as a hub id failed "
            f"({first[:200]}).{hint} Give {NAMES_THAT_WORK}."
        ) from None


@contextlib.contextmanager
def new_head_explained(note: str | None) -> Iterator[None]:
    """transformers logs a table marking a new classification head's weights MISSING on every load, which
    reads like a broken checkpoint. When those are the only entries, print `note` instead (None: nothing;
    the adapter brings the trained head); any other report is left as it is."""
    handlers = logging.getLogger("transformers").handlers
    swallowed: list[str] = []

    def only_new_head(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = re.findall(r"^([\w.]+)\s*\|\s*([A-Z_]+)\s*\|", text, flags=re.MULTILINE)
        if rows and all(
            status == "MISSING" and key.split(".")[0] in CLASSIFIER_HEADS for key, status in rows
        ):
            swallowed.append(", ".join(key for key, _ in rows))
            return False
        return True

    for handler in handlers:
        handler.addFilter(only_new_head)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(only_new_head)
    if swallowed and note:
        print(f"deltatune: {note} ({swallowed[0]} newly initialised)", file=sys.stderr)


def load_tokenizer_from(name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder, bundled name or hub id, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    from ..quant import load_quantized, quantization_settings, quantize_base
    from ..quant.allocator import return_large_blocks_to_os

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
        known = ", ".join(["full", *sorted(m.lower() for m in registered_methods())])
        raise ConfigError(
            f"adapter.method={method!r} is not a known method; choose one of: {known}"
        ) from None


def check_adapter_section(spec: AdapterSpec) -> type[AdapterConfig] | None:
    """The adapter section's method exists and every key is one of its fields (the method's config class;
    None for method: full). Needs no model, so `validate_config` runs it before anything is loaded."""
    if spec.method == "full":
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
    if spec.method == "full":
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
