"""What prompt tuning and prefix tuning share: the config fields PEFT calls `PromptLearningConfig`, reading the
model's shape into them, and where the method lives (a wrapper around the input embeddings).

Supported models: transformers decoder-only and encoder-only models that accept `inputs_embeds` (and, for
prefix tuning, a KV cache: `cache`, or `past_key_values` before transformers 5.24), and for prompt tuning
encoder-decoder models whose encoder reads token ids (T5, BART, mBART). An encoder-decoder adapter has
`num_transformer_submodules` 2, as PEFT writes it: its weights hold a second set of virtual tokens for the
decoder, which PEFT's prompt tuning never uses, and neither does deltatune (it is kept so files load both ways).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.errors import AdapterConfigError, AdapterFormatError, TargetingError
from ..core.input_hooks import InputRewritingLayer, install_input_hooks
from ..core.layer import AdapterLayer
from ..core.method import AdapterMethod
from ..core.targeting import TargetPreview

# AdapterConfig fields that select layers; a virtual-token method has no layers to select.
_LAYER_SELECTION = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class VirtualTokenConfig(AdapterConfig):
    """PEFT's prompt-learning fields. The model-shape fields are filled from the model by `inject` and saved,
    so that PEFT reads the file without the model at hand."""

    required_keys: ClassVar[tuple[str, ...]] = ("num_virtual_tokens",)
    state_key_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise AdapterConfigError(
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        for key in _LAYER_SELECTION:
            if getattr(self, key) not in (None, [], ""):
                raise AdapterConfigError(
                    f"{self.peft_type} acts on the model's input, not on chosen layers: remove {key!r}"
                )
        if self.num_transformer_submodules not in (None, 1, 2):
            raise AdapterConfigError(
                f"num_transformer_submodules={self.num_transformer_submodules}: 1 (decoder-only and encoder-only "
                "models) or 2 (encoder-decoder models)"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for key in _LAYER_SELECTION:  # PEFT's prompt-learning configs have no such fields
            data.pop(key, None)
        return data


def text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TargetingError(
            f"{type(model).__name__} has no transformers `config`; virtual-token methods need a transformers model"
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_shape(model: nn.Module) -> dict[str, int]:
    """hidden size, layers and attention heads, under PEFT's names."""
    config = text_config(model)
    shape = {
        "token_dim": _first(config, "hidden_size", "n_embd", "d_model"),
        "num_layers": _first(config, "num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": _first(config, "num_attention_heads", "n_head", "num_heads"),
    }
    missing = [k for k, v in shape.items() if v is None]
    if missing:
        raise AdapterConfigError(
            f"cannot read {missing} from {type(config).__name__}; set them in the config"
        )
    return {k: int(v) for k, v in shape.items()}


def task_type_of(model: nn.Module) -> str | None:
    name = type(model).__name__
    if is_encoder_decoder(model):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if name.endswith(suffix):
            return task
    return None


def input_embedding_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None:
        raise TargetingError(
            f"{type(model).__name__} has no get_input_embeddings(); virtual-token methods need a transformers model"
        )
    for name, module in model.named_modules():
        if module is embedding:
            return name
    raise TargetingError("the input embedding is not a submodule of the model")


class VirtualTokenMethod(AdapterMethod):
    """Shared plumbing: the wrapper sits on the input embeddings and hooks the model's forward."""

    supported_modules = "the model's input embeddings (chosen automatically)"

    @classmethod
    def shape_fields(cls, model: nn.Module, config: VirtualTokenConfig) -> dict[str, Any]:
        """Values for the model-shape fields the config leaves unset."""
        return {k: v for k, v in model_shape(model).items() if getattr(config, k) is None}

    @classmethod
    def resolve_config(cls, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        assert isinstance(config, VirtualTokenConfig)
        updates = cls.shape_fields(model, config)
        if config.num_transformer_submodules is None:
            updates["num_transformer_submodules"] = 2 if is_encoder_decoder(model) else 1
        elif config.num_transformer_submodules != (2 if is_encoder_decoder(model) else 1):
            kind = "an encoder-decoder" if is_encoder_decoder(model) else "a decoder-only or encoder-only"
            raise AdapterConfigError(
                f"num_transformer_submodules={config.num_transformer_submodules}, but {type(model).__name__} is "
                f"{kind} model (1 for those, 2 for encoder-decoders); the adapter was made for another model"
            )
        if config.task_type is None and task_type_of(model) is not None:
            updates["task_type"] = task_type_of(model)
        return dataclasses.replace(config, **updates) if updates else config

    @classmethod
    def saved_width(cls, config: VirtualTokenConfig) -> int:
        """Columns of the saved `prompt_embeddings` the config implies (one virtual token per row)."""
        raise NotImplementedError

    @classmethod
    def saved_rows(cls, config: VirtualTokenConfig) -> int:
        """Rows of the saved `prompt_embeddings`: one virtual token each, per transformer submodule."""
        return config.num_virtual_tokens * (config.num_transformer_submodules or 1)

    @classmethod
    def check_saved_state(
        cls, model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor], source: str
    ) -> None:
        """The saved virtual tokens have the shape the config's sizes give, so none of them can make the
        loader allocate more than the file holds."""
        assert isinstance(config, VirtualTokenConfig)
        saved = state.get("prompt_embeddings")
        if saved is None or saved.dim() != 2:  # nothing to check the sizes against: refused before inject
            found = "no tensor" if saved is None else f"a tensor of shape {tuple(saved.shape)}"
            raise AdapterFormatError(
                f"{source}: {cls.peft_type} needs a 2-D prompt_embeddings tensor in its weights file; it holds "
                f"{found} under that name"
            )
        config = cls.resolve_config(model, config)
        expected = (cls.saved_rows(config), cls.saved_width(config))
        if tuple(saved.shape) != expected:
            raise AdapterFormatError(
                f"{source}: the config implies prompt_embeddings of shape {expected} (num_virtual_tokens, "
                f"token_dim, ...), but the saved tensor is {tuple(saved.shape)}; the config does not belong to "
                "these weights"
            )

    @classmethod
    def preview(cls, model: nn.Module, config: AdapterConfig) -> TargetPreview:
        name = input_embedding_name(model)
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and not isinstance(module, cls.layer_class):
            raise TargetingError(
                f"the input embeddings {name!r} already carry a {type(module).__name__} "
                f"(adapters {module.adapter_names}); {cls.peft_type} lives there, so the two cannot be combined. "
                "Prompt and prefix tuning exclude each other, as does LoRA on the input embeddings."
            )
        return TargetPreview({name: type(module).__name__}, [], [])

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @classmethod
    def attach(cls, model: nn.Module, wrappers: list[AdapterLayer]) -> None:
        for wrapper in wrappers:
            assert isinstance(wrapper, InputRewritingLayer)
            install_input_hooks(model, wrapper)

    @classmethod
    def wrap(cls, module: nn.Module, module_name: str) -> AdapterLayer:
        return cls.layer_class(module)
