"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): learn
`num_virtual_tokens` input embeddings that are prepended to every sequence. Registered as "PROMPT_TUNING".

Per call, before the model runs (the hook in core/input_hooks.py):
- first call of a sequence (no KV cache yet): `inputs_embeds = [prompt; embed(input_ids)]`; the attention mask
  gets `n` ones in front, 2-D labels get `n` ignored (-100) positions, `token_type_ids` `n` zeros, and
  explicit `position_ids` / `cache_position` become `[0..n-1; p + n]`;
- later generation steps (the prompt is already in the cache): the mask is extended and positions shifted.
After it runs, sequence logits are trimmed to the caller's length, so `outputs.logits[:, t]` still belongs to
`input_ids[:, t]` (PEFT returns the virtual positions too; compare its `logits[:, n:]`).

Encoder-decoder models (T5, BART), as PEFT does it: the virtual tokens go in front of the encoder's input, and
the decoder attends to them through cross-attention; decoder inputs, labels and logits are untouched. The
encoder is hooked itself, since `generate` calls it directly; the model's own call only extends the attention
mask the decoder's cross-attention reads, whenever it is shorter than the encoder's output.

Initialisation (`prompt_tuning_init`): "TEXT" embeds `prompt_tuning_init_text` with the tokenizer at
`tokenizer_name_or_path`, repeated or cut to length (Lester et al.'s best); "SAMPLE_VOCAB" copies the embeddings
of random vocabulary rows; "RANDOM" draws from a normal with the embedding matrix's own std (PEFT draws from
N(0, 1), far off the scale of real token embeddings). On disk: PEFT's `prompt_embeddings`, (n, token_dim).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.capabilities import Capability
from ..core.config import AdapterConfig
from ..core.errors import AdapterConfigError, TargetingError
from ..core.input_hooks import (
    InputRewritingLayer,
    OutputFix,
    cached_length,
    extend_attention_mask,
    install_input_hooks,
    shift_positions,
)
from ..core.kv_cache import cache_in
from ..core.registry import register
from .virtual_tokens import VirtualTokenConfig, VirtualTokenMethod, is_encoder_decoder

INIT_CHOICES = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def validate(self) -> None:
        super().validate()
        self.prompt_tuning_init = str(
            getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        ).upper()
        if self.prompt_tuning_init not in INIT_CHOICES:
            raise AdapterConfigError(
                f"prompt_tuning_init must be one of {INIT_CHOICES}, got {self.prompt_tuning_init!r}"
            )
        if self.prompt_tuning_init == "TEXT" and not (
            self.prompt_tuning_init_text and self.tokenizer_name_or_path
        ):
            raise AdapterConfigError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the words to start from) and "
                "tokenizer_name_or_path (a tokenizer folder or hub id)"
            )


def _init_text_ids(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # an adapter config must never run code
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AdapterConfigError("prompt_tuning_init_text tokenizes to nothing; give it some words")
    n = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
    return (ids * (n // len(ids) + 1))[:n]


class PromptTuningLayer(InputRewritingLayer):
    adapter_attributes = ("prompt_embeddings",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()
        self.encoders: list[nn.Module] = []  # an encoder-decoder's encoder, hooked beside the model
        self.virtual_tokens: dict[str, int] = {}  # adapter -> the tokens in front of the input

    def create_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        assert isinstance(config, PromptTuningConfig)
        table = self.base_layer.weight.detach()
        self.virtual_tokens[name] = config.num_virtual_tokens
        n, dim = config.num_virtual_tokens * (config.num_transformer_submodules or 1), config.token_dim
        if dim != table.shape[1]:
            raise AdapterConfigError(f"token_dim={dim} but the input embeddings have width {table.shape[1]}")
        if config.prompt_tuning_init == "TEXT":
            init = table[torch.tensor(_init_text_ids(config), device=table.device)]
        elif config.prompt_tuning_init == "SAMPLE_VOCAB":
            init = table[torch.randint(0, table.shape[0], (n,), device=table.device)]
        else:
            init = torch.randn(n, dim, device=table.device) * table.float().std()
        self.prompt_embeddings[name] = nn.Parameter(init.float().clone())

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings[name]}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str = "") -> None:
        self.copy_checked(
            self.adapter_state_dict(name), state, where, hint=" (num_virtual_tokens or token_dim)"
        )

    def rewrite_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> OutputFix | None:
        name = self.unmerged_active[0]
        prompt = self.prompt_embeddings[name][: self.virtual_tokens[name]]
        n = prompt.shape[0]
        if any(model is encoder for encoder in self.encoders):
            return self._rewrite_encoder(prompt, inputs)
        if is_encoder_decoder(model):
            _extend_cross_attention_mask(inputs, n)
            return None
        extend_attention_mask(inputs, n)
        if cached_length(cache_in(inputs)) > 0:  # a generation step: the prompt is in the cache
            shift_positions(inputs, n, prepend=False)
            return None
        batch, length = self._prepend(prompt, inputs)
        shift_positions(inputs, n, prepend=True)
        labels = inputs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
            inputs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        token_types = inputs.get("token_type_ids")
        if token_types is not None:
            inputs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
        return lambda output: trim_sequence_logits(output, length)

    def _prepend(self, prompt: torch.Tensor, inputs: dict[str, Any]) -> tuple[int, int]:
        """The input as embeddings with the virtual tokens in front; returns the caller's (batch, length)."""
        ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        if embeds is None:
            embeds = self.base_layer(ids)
        batch, length = embeds.shape[:2]
        inputs["input_ids"] = None
        inputs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        return batch, length

    def _rewrite_encoder(self, prompt: torch.Tensor, inputs: dict[str, Any]) -> None:
        """The encoder's input with the virtual tokens in front, and its attention mask with them (unless the
        model's own call extended it already)."""
        _, length = self._prepend(prompt, inputs)
        mask = inputs.get("attention_mask")
        if mask is not None and mask.shape[-1] == length:
            extend_attention_mask(inputs, prompt.shape[0])


def _extend_cross_attention_mask(inputs: dict[str, Any], n: int) -> None:
    """An encoder-decoder's attention mask, which its decoder's cross-attention reads over the encoder's output
    (n virtual tokens longer than the input): extended once, when it is the input's length."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return
    encoded = inputs.get("encoder_outputs")
    if encoded is not None:
        hidden = encoded[0] if isinstance(encoded, (tuple, list)) else encoded.last_hidden_state
        short = mask.shape[-1] == hidden.shape[1] - n
    else:
        source = (
            inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        )
        short = source is not None and mask.shape[-1] == source.shape[1]
    if short:
        extend_attention_mask(inputs, n)


def trim_sequence_logits(output: Any, length: int) -> Any:
    """Keep the last `length` positions of per-token logits (the caller's own tokens)."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] > length:
        output.logits = logits[:, -length:]
    return output


class PromptTuningMethod(VirtualTokenMethod):
    config_class = PromptTuningConfig
    layer_class = PromptTuningLayer
    capabilities = frozenset({Capability.CHECKPOINTED})  # its virtual tokens are inputs: recomputing is exact
    lacks = {
        Capability.MERGE: "prompt tuning prepends learned virtual tokens to the input, which no change of the "
        "weights can express",
        Capability.SHARE_PREFIX: "prompt tuning's virtual tokens come before the prompt's prefix",
        Capability.STATIC_CACHE: "prompt tuning's virtual tokens take positions before the prompt",
    }

    @classmethod
    def saved_width(cls, config: VirtualTokenConfig) -> int:
        return config.token_dim

    @classmethod
    def preview(cls, model: nn.Module, config: AdapterConfig):
        encoder = model.get_encoder() if is_encoder_decoder(model) else None
        if encoder is not None and "input_ids" not in inspect.signature(encoder.forward).parameters:
            raise TargetingError(
                f"{type(model).__name__}'s encoder reads no token ids ({type(encoder).__name__}: audio or image "
                "features); prompt tuning prepends virtual tokens to an encoder's token embeddings"
            )
        return super().preview(model, config)

    @classmethod
    def attach(cls, model: nn.Module, wrappers: list) -> None:
        """Decoder-only and encoder-only models: the model's call is rewritten. Encoder-decoders: the encoder's
        too (generate runs the encoder by itself, then the model on the decoder side)."""
        super().attach(model, wrappers)
        if not is_encoder_decoder(model):
            return
        encoder = model.get_encoder()
        for wrapper in wrappers:
            if not any(e is encoder for e in wrapper.encoders):
                wrapper.encoders.append(encoder)
            install_input_hooks(encoder, wrapper)


register("PROMPT_TUNING")(PromptTuningMethod)
