"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): learned key
and value vectors for `num_virtual_tokens` positions in front of every attention layer. Registered as
"PREFIX_TUNING".

The prefix goes in through the model's KV-cache interface: on the first call of a sequence the hook seeds the
cache with the prefix of every layer, prepends `n` ones to the attention mask and shifts explicit positions by
`n` (the model itself then numbers the real tokens n, n+1, ..., as PEFT does). Generation works unchanged:
later steps only extend the mask and shift positions.

Reparametrization (`prefix_projection`, Li & Liang's fix for unstable training): while training, the prefix is
`MLP(embedding)` with a tanh MLP of width `encoder_hidden_size`. Saving folds it away: the file holds the
prefix itself, PEFT's `prompt_embeddings` of shape (n, num_layers * 2 * kv_heads * head_dim), laid out per
token as [layer 0 key, layer 0 value, layer 1 key, ...] with heads inside each. Loading such a file gives the
folded (plain) form.

Incompatible with gradient checkpointing (the recomputed forward would write the cache twice); the training
config refuses that combination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

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
    shift_positions,
)
from ..core.kv_cache import cache_in, new_dynamic_cache, put_cache, takes_cache
from ..core.layer import initialization_skipped
from ..core.registry import register
from .virtual_tokens import VirtualTokenConfig, VirtualTokenMethod, is_encoder_decoder, text_config


@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    peft_only_fields: ClassVar[frozenset[str]] = frozenset()

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None  # PEFT's field; only None (random) is implemented

    def validate(self) -> None:
        super().validate()
        if self.init_weights is not None:
            raise AdapterConfigError(
                f"init_weights={self.init_weights!r} is not implemented; leave it unset (random init)"
            )


class PrefixEncoder(nn.Module):
    """The training-time reparametrization: virtual-token embeddings through a two-layer tanh MLP."""

    def __init__(self, tokens: int, token_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(tokens, token_dim))
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding)


class PrefixTuningLayer(InputRewritingLayer):
    adapter_attributes = ("prefix_embeddings", "prefix_encoders")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prefix_embeddings = nn.ParameterDict()
        self.prefix_encoders = nn.ModuleDict()
        self.layouts: dict[
            str, tuple[int, int, int, int]
        ] = {}  # name -> (tokens, layers, kv heads, head dim)

    def create_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        assert isinstance(config, PrefixTuningConfig)
        heads, dim = config.num_attention_heads, config.token_dim
        if dim % heads:
            raise AdapterConfigError(f"token_dim={dim} is not divisible by num_attention_heads={heads}")
        n, layers = config.num_virtual_tokens, config.num_layers
        self.layouts[name] = (n, layers, heads, dim // heads)
        width = layers * 2 * dim
        device = self.base_layer.weight.device
        if initialization_skipped():  # a loader fills the (already folded) prefix: no MLP to build
            self.prefix_embeddings[name] = nn.Parameter(torch.empty(n, width, device=device))
        elif config.prefix_projection:
            hidden = config.encoder_hidden_size or dim
            self.prefix_encoders[name] = PrefixEncoder(n, dim, hidden, width).to(device)
        else:
            self.prefix_embeddings[name] = nn.Parameter(torch.randn(n, width, device=device))

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.layouts.pop(name, None)

    def prefix(self, name: str) -> torch.Tensor:
        """(n, layers * 2 * kv_dim): the learned prefix, through the MLP while it is still there."""
        if name in self.prefix_encoders:
            return self.prefix_encoders[name]()
        return self.prefix_embeddings[name]

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix(name)}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor], where: str = "") -> None:
        if name in self.prefix_encoders:  # a saved prefix is already folded: load it into the plain form
            n, layers, heads, head_dim = self.layouts[name]
            del self.prefix_encoders[name]
            device = self.base_layer.weight.device
            self.prefix_embeddings[name] = nn.Parameter(
                torch.empty(n, layers * 2 * heads * head_dim, device=device)
            )
        hint = " (num_virtual_tokens, num_layers, num_attention_heads or token_dim)"
        self.copy_checked(self.adapter_state_dict(name), state, where, hint)

    def rewrite_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> OutputFix | None:
        if is_encoder_decoder(model):
            return self._rewrite_decoder(model, inputs)
        name = self.unmerged_active[0]
        n, layers, heads, head_dim = self.layouts[name]
        extend_attention_mask(inputs, n)
        shift_positions(inputs, n, prepend=False)
        cache = cache_in(inputs)
        if cached_length(cache) > 0:  # a generation step: the prefix is already in the cache
            return None
        reference = inputs.get("inputs_embeds")
        if reference is None:
            reference = inputs["input_ids"]
        kv = self._prefix_kv(name, reference.shape[0])
        if cache is None:
            cache = new_dynamic_cache(text_config(model))
        for layer in range(layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        put_cache(model, inputs, cache)
        return None

    def _prefix_kv(self, name: str, rows: int) -> torch.Tensor:
        """The prefix as keys and values, (layers*2, rows, heads, n, head_dim): layer l's keys at 2l, values
        at 2l + 1."""
        n, layers, heads, head_dim = self.layouts[name]
        prefix = self.prefix(name).to(self.base_layer.weight.dtype)
        kv = prefix.view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3).unsqueeze(1)
        return kv.expand(-1, rows, -1, -1, -1)

    def _rewrite_decoder(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """An encoder-decoder, as PEFT does it: the prefix goes into the decoder's self-attention cache only
        (the encoder and the cross-attention see none), and a decoder attention mask gets its n positions."""
        from transformers import DynamicCache, EncoderDecoderCache

        name = self.unmerged_active[0]
        n, layers = self.layouts[name][:2]
        extend_attention_mask(inputs, n, key="decoder_attention_mask")
        cache = cache_in(inputs)
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise TypeError(
                f"an encoder-decoder's cache is an EncoderDecoderCache, got {type(cache).__name__}"
            )
        if cache is not None and cached_length(cache.self_attention_cache) > 0:
            return  # a generation step: the prefix is in the cache
        reference = next(
            (inputs[k] for k in ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")
             if inputs.get(k) is not None),
            None,
        )  # fmt: skip
        if reference is None:
            reference = inputs["encoder_outputs"][0]
        kv = self._prefix_kv(name, reference.shape[0])
        # PEFT's layout for two submodules: the layers' keys and values twice over, in groups of four per
        # decoder layer (self key, self value, cross key, cross value; it then empties the cross part). So decoder
        # layer i reads entries 4i and 4i + 1 of the doubled list, which is not layer i's own pair.
        doubled = torch.cat([kv, kv])
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for layer in range(layers):
            cache.self_attention_cache.update(doubled[4 * layer], doubled[4 * layer + 1], layer)
        put_cache(model, inputs, cache)


class PrefixTuningMethod(VirtualTokenMethod):
    config_class = PrefixTuningConfig
    layer_class = PrefixTuningLayer
    lacks = {
        Capability.MERGE: "prefix tuning adds learned keys and values to every attention layer; attention over "
        "extra positions is not a weight change",
        Capability.SHARE_PREFIX: "prefix tuning's virtual keys and values come before the prompt's prefix",
        Capability.STATIC_CACHE: "prefix tuning's virtual keys and values take cache positions before the prompt",
        Capability.CHECKPOINTED: "the prefix travels in the KV cache, which the recomputed forward would extend "
        "twice",
    }

    @classmethod
    def saved_width(cls, config: VirtualTokenConfig) -> int:
        return config.num_layers * 2 * config.token_dim

    @classmethod
    def saved_rows(cls, config: VirtualTokenConfig) -> int:
        return config.num_virtual_tokens  # one prefix, whatever num_transformer_submodules says

    @classmethod
    def shape_fields(cls, model: nn.Module, config: VirtualTokenConfig) -> dict[str, Any]:
        """The prefix is keys/values, so its width is that of the KV heads (grouped-query attention has fewer
        KV heads than query heads), as PEFT computes it."""
        fields = super().shape_fields(model, config)
        text = text_config(model)
        kv_heads = getattr(text, "num_key_value_heads", None)
        if kv_heads is not None and config.token_dim is None and config.num_attention_heads is None:
            # both fields came from the model's shape in `fields`
            head_dim = getattr(text, "head_dim", None) or fields["token_dim"] // fields["num_attention_heads"]
            fields["token_dim"] = int(head_dim) * int(kv_heads)
            fields["num_attention_heads"] = int(kv_heads)
        if config.encoder_hidden_size is None:
            fields["encoder_hidden_size"] = fields.get("token_dim", config.token_dim)
        return fields

    @classmethod
    def preview(cls, model: nn.Module, config: AdapterConfig):
        if not takes_cache(model):
            import transformers

            raise TargetingError(
                f"{type(model).__name__}.forward takes no KV cache (`cache` or `past_key_values`) in "
                f"transformers {transformers.__version__}, and prefix tuning feeds the prefix through it; use "
                "prompt tuning for this model"
            )
        return super().preview(model, config)


register("PREFIX_TUNING")(PrefixTuningMethod)
