"""Validation metrics: the task loss over a split, classification metrics, and metrics on generated answers."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..core.adapters import adapter_in_use
from ..core.modes import eval_mode
from ..data.formats import Example
from ..runtime import generate
from ..runtime.sampling import end_of_sequence_ids
from .batching import collate
from .loss import task_loss


def macro_f1(predictions: list[int], labels: list[int], n_classes: int) -> float:
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / n_classes


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    *,
    batch_size: int,
    pad_id: int,
    classification: bool,
    device: torch.device,
    autocast: Any = contextlib.nullcontext,
    n_classes: int = 0,
    label_names: list[str] | None = None,
    share_prefix: bool = False,
) -> dict[str, Any]:
    """Loss (and accuracy, macro F1) over `examples`; with `label_names`, also the majority-class baseline
    and per-class precision / recall (`deltatune eval`). `share_prefix`: as in `task_loss`; batches sorted by
    length still open with the same prompt template."""
    total, count, predictions = 0.0, 0, [0] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([examples[i] for i in rows], pad_id, classification)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss, n, logits = task_loss(model, batch, classification, share_prefix=share_prefix)
            if classification:
                for row, prediction in zip(rows, logits.argmax(-1).tolist(), strict=True):
                    predictions[row] = prediction
            total += float(loss)
            count += n
    metrics = {"loss": total / max(count, 1)}
    if classification:
        labels = [e.labels for e in examples]
        metrics["accuracy"] = sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
        metrics["f1"] = macro_f1(predictions, labels, n_classes)
        if label_names:
            metrics |= classification_details(predictions, labels, label_names)
    return metrics


def classification_details(predictions: list[int], labels: list[int], names: list[str]) -> dict[str, Any]:
    """What accuracy alone hides: the accuracy of always answering the most frequent class, and each class's
    precision, recall and support."""
    support = [labels.count(c) for c in range(len(names))]
    majority = max(range(len(names)), key=support.__getitem__)
    per_class = {}
    for c, name in enumerate(names):
        predicted = sum(p == c for p in predictions)
        hits = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        per_class[name] = {
            "precision": hits / predicted if predicted else 0.0,
            "recall": hits / support[c] if support[c] else 0.0,
            "support": support[c],
        }
    return {
        "majority_baseline": {"label": names[majority], "accuracy": support[majority] / max(len(labels), 1)},
        "per_class": per_class,
    }


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers with the model's active adapter (or none), through `runtime.generate`, the same
    generation `deltatune generate` and the server run; returns the decoded new text of each prompt."""
    adapter = adapter_in_use(model)  # None: no adapters, as in full fine-tuning, or disabled
    eos = end_of_sequence_ids(model, tokenizer)
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            done = generate(
                model, [prompts[i] for i in rows], [adapter] * len(rows), max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
            )  # fmt: skip
            for row, completion in zip(rows, done, strict=True):
                answers[row] = tokenizer.decode(completion.tokens, skip_special_tokens=True)
    return [a.strip() for a in answers]


def answer_metrics(answers: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """exact_match: identical after stripping; json_valid: a JSON object with the reference's keys (the
    required shape); json_match: equal as JSON values (whitespace and key order do not matter). The rules are
    GRPO's rewards of the same names (task/rewards.py), so a reward and its metric cannot disagree."""
    from .rewards import BUILT_IN

    n = max(len(answers), 1)
    return {
        name: sum(BUILT_IN[name]([""] * len(answers), answers, references)) / n
        for name in ("exact_match", "json_valid", "json_match")
        if name in names
    }


def validation_metrics(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    spec: Any,
    *,
    classification: bool,
    n_classes: int,
    device: torch.device,
    autocast: Any = contextlib.nullcontext,
    with_loss: bool = True,
    label_names: list[str] | None = None,
    share_prefix: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """What an evaluation reports for an `eval` config section: the loss (and accuracy / F1) on the first
    `loss_samples` examples, and the generation metrics on the first `generate_samples`. Also returns the
    generated answers, for display."""
    metrics: dict[str, float] = {}
    if with_loss:
        metrics |= evaluate(
            model, examples[: spec.loss_samples], batch_size=spec.batch_size, pad_id=tokenizer.pad_token_id,
            classification=classification, device=device, autocast=autocast, n_classes=n_classes,
            label_names=label_names, share_prefix=share_prefix,
        )  # fmt: skip
    answers: list[str] = []
    if spec.generate_metrics:
        sample = examples[: spec.generate_samples]
        with autocast():
            answers = generate_answers(
                model, tokenizer, [e.prompt_ids for e in sample], max_new_tokens=spec.max_new_tokens,
                batch_size=spec.batch_size,
            )  # fmt: skip
        metrics |= answer_metrics(answers, [e.reference or "" for e in sample], spec.generate_metrics)
    return metrics, answers
