"""Generate with a base model plus an optional adapter: what `deltatune generate` and the quickstart's
"chat with the result" use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .core.errors import AdapterFormatError

if TYPE_CHECKING:
    from .runtime.sampling import Sampling


class Generator:
    """Greedy generation through `runtime.generate` (the engine the server and training evaluation use
    too). Plain prompts go through the tokenizer's chat template when it has one; a training
    config's data section renders them exactly as training did (`encoder`, see `for_config`)."""

    def __init__(
        self,
        base: str,
        adapter: str | Path | None = None,
        *,
        system_prompt: str | None = None,
        allow_base_mismatch: bool = False,
        compiled: bool = False,
        dtype: str = "float32",
        quantize: str | None = None,
    ):
        """`compiled`: decode through a compiled step over a static KV cache (`runtime.compiled`), ~3x the
        tokens a second on a CPU once the first prompt has compiled it (minutes). `dtype`: the base's (float32,
        bfloat16, float16; the adapter keeps its own): bfloat16 on a CPU with AVX512-BF16 or AMX decodes a
        compiled single stream ~1.3x faster than float32 (bench/README §30), with answers that may differ.
        `quantize`: int8 or int4 packs the base's linear layers for torch's CPU kernels (runtime.weight_only;
        with a half `dtype`), the adapter loaded on top unmerged."""
        from .classification import adapter_task
        from .core.io import load_adapter, saved_label_names
        from .models.loading import load_tokenizer_from
        from .runtime.inference_model import load_inference_model

        if adapter is not None and adapter_task(adapter) == "SEQ_CLS":
            labels = saved_label_names(adapter)
            raise AdapterFormatError(
                f"{adapter} is a classifier ({'labels ' + ', '.join(labels) if labels else 'task SEQ_CLS'}), not "
                f"a text generator: use `deltatune classify --base {base} --adapter {adapter}`"
            )
        self.model = load_inference_model(base, torch.device("cpu"), dtype, quantize)
        self.tokenizer = load_tokenizer_from(base)
        self.adapter_name: str | None = None  # the model-side name; None: the base alone
        if adapter is not None:
            load_adapter(
                self.model, adapter, tokenizer=self.tokenizer, allow_base_mismatch=allow_base_mismatch
            )
            self.adapter_name = "default"
        self.decoder: Any = None
        if compiled:
            from .runtime.compiled import CompiledDecoder

            self.decoder = CompiledDecoder(self.model.requires_grad_(False), self.adapter_name)
        self.system_prompt = system_prompt
        self.encoder: Any = None
        self._prompts: Any = None

    def for_config(self, data_spec: Any) -> Generator:
        """Render prompts with a training config's data section (format, templates, system prompt)."""
        from .data.formats import Encoder

        self.encoder = Encoder(self.tokenizer, data_spec)
        return self

    def prompt_ids(self, prompt: str | dict[str, Any]) -> list[int]:
        """A text (or, with a config, a row of its fields) as the ids generation starts from."""
        if self.encoder is not None:
            fields = prompt if isinstance(prompt, dict) else self.encoder.prompt_fields(prompt)
            return self.encoder.prompt_ids(fields)
        if isinstance(prompt, dict):
            raise ValueError("a prompt given as fields needs a training config (--config) to render it")
        return self._renderer().user_prompt_ids(prompt)

    def _renderer(self) -> Any:
        """The prompt renderer for the current system prompt (built once; again if it changes)."""
        from .data.prompts import PromptRenderer

        if self._prompts is None or self._prompts.system_prompt != self.system_prompt:
            self._prompts = PromptRenderer(self.tokenizer, self.system_prompt)
        return self._prompts

    def __call__(
        self, prompt: str | dict[str, Any], *, max_new_tokens: int = 64, sampling: Sampling | None = None
    ) -> str:
        """The answer to one prompt: greedy, unless `sampling` says otherwise."""
        from .runtime import generate
        from .runtime.sampling import end_of_sequence_ids

        pad = self.tokenizer.pad_token_id
        eos = end_of_sequence_ids(self.model, self.tokenizer)
        if self.decoder is not None:
            done = self.decoder.generate(
                self.prompt_ids(prompt), max_new_tokens=max_new_tokens, eos_token_id=eos, sampling=sampling
            )
            return self.tokenizer.decode(done.tokens, skip_special_tokens=True).strip()
        (done,) = generate(
            self.model,
            [self.prompt_ids(prompt)],
            [self.adapter_name],
            max_new_tokens=max_new_tokens,
            pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
            eos_token_id=eos,
            sampling=sampling,
        )
        return self.tokenizer.decode(done.tokens, skip_special_tokens=True).strip()
