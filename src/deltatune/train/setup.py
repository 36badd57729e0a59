"""Build the delta a run trains on a loaded base (task/loading.py loads the base and its tokenizer)."""

from __future__ import annotations

from torch import nn

from ..core.config import AdapterConfig
from ..core.inject import inject
from ..models.loading import CLASSIFIER_HEADS
from ..task.adapter_section import check_adapter_section
from ..task.config import AdapterSpec, ConfigError


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
