"""A fine-tune that forgets less (`training.kl_penalty`): the task loss plus beta x KL(base || adapted), the
mean over tokens of sum_v p_base(v) (log p_base(v) - log p_adapted(v)), on every training batch's prompt
tokens (where the next token is the prompt's, not the answer the task must move the model to; off with
`kl_penalty_prompts: false`) and, with `kl_penalty_texts`, on that many texts of a general corpus each step.

The base is the same model with its adapters off (or, after training.init_adapter, the adapter the run
started from), run without gradients: one more forward per batch, no second model. The KL needs the whole
next-token distribution, so the output head runs on every position of the batch (no fused loss): for SmolLM2
that is batch x length x 49k floats for each model, ~200 MB at 8 x 128.

Why it matters: examples/README §9 measured that LoRA r=16 on the tweets moved SmolLM2 on general text 11x
more than a full fine-tune at equal task accuracy; the adapter's base is right there to hold it close.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpora import read_corpus
from ..data.formats import IGNORE
from ..task.kl import text_batches, token_kl
from ..task.loss import task_loss as next_token_loss
from .answer_logps import right_padded
from .preference import reference_of


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    return model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, -ids.shape[1] :]


class KLPenalty:
    def __init__(self, training: Any, tokenizer: Any) -> None:
        self.beta = training.kl_penalty
        self.per_step = training.kl_penalty_texts
        self.on_prompts = training.kl_penalty_prompts
        self.general: list[list[int]] = []
        if self.per_step:
            texts, _ = read_corpus(training.kl_penalty_corpus)
            limit = training.kl_penalty_max_tokens
            self.general = [
                b["input_ids"][0].tolist() for b in text_batches(tokenizer, texts, limit, batch_size=1)
            ]

    def task_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], share_prefix: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token loss on the labelled tokens plus beta x the KL on the batch's prompt tokens (the loss
        alone, computed as without a penalty, when the prompts are left free)."""
        if not self.on_prompts:
            loss_sum, count, _ = next_token_loss(model, batch, False, share_prefix=share_prefix)
            loss = loss_sum / max(count, 1)
            return loss, {"task_loss": float(loss.detach())}
        logits = _logits(model, batch)
        with torch.no_grad(), reference_of(model):
            base = _logits(model, batch)
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE
        loss = F.cross_entropy(logits[:, :-1][trained].float(), targets[trained])
        # where the next token is prompt text, not the answer the task must move the model to
        prompt_text = batch["attention_mask"][:, 1:].bool() & ~trained
        kl = token_kl(logits[:, :-1], base[:, :-1], prompt_text)
        return loss + self.beta * kl, {"task_loss": float(loss.detach()), "kl_to_base": float(kl.detach())}

    def general_loss(self, model: nn.Module, step: int, device: torch.device) -> tuple[torch.Tensor, float]:
        """beta x the KL on this step's general texts (the corpus cycled in order), and the KL itself."""
        rows = [self.general[(step * self.per_step + i) % len(self.general)] for i in range(self.per_step)]
        ids, mask = right_padded(rows, pad_id=0)
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        logits = _logits(model, batch)
        with torch.no_grad(), reference_of(model):
            base = _logits(model, batch)
        kl = token_kl(logits, base, batch["attention_mask"].bool())
        return self.beta * kl, float(kl.detach())
