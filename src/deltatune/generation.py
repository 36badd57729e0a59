"""Generate with a base model plus an optional adapter: what `deltatune generate` and the quickstart's
"chat with the result" use."""

from __future__ import annotations

from pathlib import Path

import torch


class Generator:
    """Greedy generation; prompts go through the tokenizer's chat template when it has one."""

    def __init__(
        self,
        base: str,
        adapter: str | Path | None = None,
        *,
        system_prompt: str | None = None,
        template: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .core.io import load_adapter
        from .train.setup import resolve_model_path

        path = resolve_model_path(base)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if adapter is not None:
            load_adapter(self.model, adapter, tokenizer=self.tokenizer)
        self.system_prompt = system_prompt
        self.template = template  # e.g. a training config's instruction_template; the prompt fills {text}

    def render(self, prompt: str) -> str:
        if self.template:
            prompt = self.template.format(text=prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            return prompt
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, prompt: str, *, max_new_tokens: int = 64) -> str:
        batch = self.tokenizer(self.render(prompt), return_tensors="pt", add_special_tokens=False)
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
