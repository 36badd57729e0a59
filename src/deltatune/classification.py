"""Classify texts with a base model plus a classification adapter: what `deltatune classify` uses.

A classifier adapter carries a new head (`modules_to_save`) whose rows are the classes. The head is rebuilt
from the class names saved with the adapter (`deltatune.json` "labels", transformers' id2label / label2id), so
the user never guesses `num_labels` or the label order, and predictions come back as names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .core.config import load_config_file
from .core.errors import AdapterFormatError
from .core.io import CONFIG_NAME, saved_label_names


def adapter_task(folder: str | Path) -> str | None:
    """The task an adapter was trained for, as PEFT names it (SEQ_CLS, CAUSAL_LM, ...), or None."""
    return load_config_file(Path(folder) / CONFIG_NAME).task_type


class Classifier:
    """Batched classification of texts; `labels` are the adapter's class names, in index order."""

    def __init__(
        self,
        base: str,
        adapter: str | Path,
        *,
        labels: list[str] | None = None,
        max_length: int = 512,
        allow_base_mismatch: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification

        from .core.io import load_adapter
        from .models.loading import load_pretrained, load_tokenizer_from, new_head_explained

        saved = saved_label_names(adapter)
        if labels is not None and saved is not None and labels != saved:
            raise AdapterFormatError(f"{adapter} was trained with labels {saved}, not {labels}")
        self.labels = labels or saved
        if not self.labels:
            raise AdapterFormatError(
                f"{adapter} records no class labels (saved before deltatune kept them, or not a classifier); "
                "pass labels=[...] in the order the head was trained with"
            )
        self.tokenizer = load_tokenizer_from(base)
        with new_head_explained(None):  # the adapter brings the trained head
            self.model = load_pretrained(
                AutoModelForSequenceClassification,
                base,
                num_labels=len(self.labels),
                id2label=dict(enumerate(self.labels)),
                label2id={name: i for i, name in enumerate(self.labels)},
                pad_token_id=self.tokenizer.pad_token_id,
                dtype=torch.float32,
            ).eval()
        load_adapter(self.model, adapter, tokenizer=self.tokenizer, allow_base_mismatch=allow_base_mismatch)
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, texts: list[str], *, batch_size: int = 32) -> list[dict[str, Any]]:
        """Each text's predicted label and the probability of every label."""
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            probabilities = torch.softmax(self.model(**batch).logits.float(), dim=-1).tolist()
            for row in probabilities:
                best = max(range(len(row)), key=row.__getitem__)
                results.append(
                    {"label": self.labels[best], "probabilities": dict(zip(self.labels, row, strict=True))}
                )
        return results
