"""The trainer's forgetting monitor (`eval.forgetting`): at each evaluation, how far the model being trained
has moved from its base on general text, as the mean per-token KL(base || model) (task/kl.py).

An adapter's base is the same model with its adapters disabled, so nothing is stored. A full fine-tune has no
base left to ask, so the base's log-probabilities on the monitor's texts are recorded once, before the first
step, on the CPU: texts x tokens x vocabulary floats (16 x 64 x 49k for SmolLM2: at most 200 MB; the
default news sentences are ~25 tokens, so ~80 MB).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import DeltatuneError
from ..core.modes import eval_mode
from ..data.corpora import read_corpus
from ..task.kl import record_log_probs, text_batches, token_divergence

KL_KEY = "forgetting_kl"


class ForgettingBudgetExceeded(DeltatuneError, RuntimeError):
    """Every evaluation of the run was over `eval.forgetting.budget`, so no model was kept."""


class ForgettingMonitor:
    def __init__(self, spec: Any, model: nn.Module, tokenizer: Any, *, full_fine_tuning: bool) -> None:
        self.spec = spec
        texts, _ = read_corpus(spec.corpus)
        self.batches = text_batches(tokenizer, texts[: spec.texts], spec.max_tokens, batch_size=8)
        if not self.batches:
            raise DeltatuneError(
                f"eval.forgetting.corpus {spec.corpus}: no text of two tokens or more to score"
            )
        self.base_log_probs: list[torch.Tensor] | None = None
        if full_fine_tuning:  # called before the first step: the model is still the base
            with eval_mode(model):
                self.base_log_probs = record_log_probs(model, self.batches)

    def measure(self, model: nn.Module) -> float:
        """The mean KL(base || model) per token, in nats, on the monitor's texts."""
        with eval_mode(model):
            scores = token_divergence(model, self.batches, base_log_probs=self.base_log_probs)
        return float(scores["kl"].mean())

    def within_budget(self, metrics: dict[str, float]) -> bool:
        return self.spec.budget is None or metrics[KL_KEY] <= self.spec.budget

    def nothing_kept(self, evaluations: list[float]) -> ForgettingBudgetExceeded:
        least = min(evaluations) if evaluations else float("nan")
        return ForgettingBudgetExceeded(
            f"every evaluation exceeded the forgetting budget: the least KL was {least:.4f} nats per token, the "
            f"budget is eval.forgetting.budget={self.spec.budget}; no model was kept. Raise the budget, or "
            "forget less: a lower optim.lr, a smaller adapter (r), or fewer steps."
        )
