"""Validation: loss, classification metrics, and metrics on generated answers."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapters import adapter_in_use
from ..core.modes import eval_mode
from ..data.formats import IGNORE, Example
from ..runtime import generate
from ..runtime.sampling import end_of_sequence_ids
from .batching import collate
from .head_loss import fusable_head, head_loss
from .shared_prefix import continuation, shared_prefix_length


@functools.lru_cache(maxsize=16)
def _accepts_logits_to_keep(forward_owner: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_owner.forward).parameters


def task_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    classification: bool,
    *,
    fuse_head: bool = True,
    trim_logits: bool = True,
    share_prefix: bool = False,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(summed loss, number of loss terms, logits or None). Summing lets evaluation weight every token equally.

    For causal LMs only positions that carry a label need logits, and the loss needs none kept: where the
    model allows it (`fuse_head`, train/head_loss.py) the output head and the loss run together, in chunks,
    on the labelled positions only, and no logits are returned. Otherwise, with masked prompts the labelled
    positions are a short tail, so when the model takes `logits_to_keep` (transformers causal LMs do) the head
    runs on that tail only (`trim_logits`): for SmolLM2 the head is a fifth of the forward FLOPs, and the fp32
    logits of a full eval batch were gigabytes. The loss is the same on every path (tested).

    `share_prefix`: the leading tokens all rows share run once (train/shared_prefix.py); the logits returned
    then start after them. The caller makes sure the model may take a KV cache (no virtual tokens, no
    activation checkpointing, not wrapped by DDP)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if classification:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="sum"), batch["labels"].numel(), logits
    extra: dict[str, Any] = {"attention_mask": mask}
    labels = batch["labels"]
    if share_prefix and (shared := shared_prefix_length(batch)):
        rest, cached = continuation(model, batch, shared)
        ids, labels, extra = rest["input_ids"], rest["labels"], extra | cached
    targets = labels[:, 1:]  # targets[:, t] is predicted by the logits at position t
    trained = targets != IGNORE
    count = int(trained.sum())
    if fuse_head and (head := fusable_head(model, ids)) is not None:
        return head_loss(model, head, ids, targets, trained, extra), count, None
    first = int(trained.any(dim=0).nonzero()[0]) if count else targets.shape[1] - 1
    owner = type(getattr(model, "module", model))  # under DDP, the wrapped model's signature
    if trim_logits and first > 0 and _accepts_logits_to_keep(owner):
        logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - first, **extra).logits
        targets, trained = targets[:, first:], trained[:, first:]
    else:
        logits = model(input_ids=ids, **extra).logits
    logits = logits[:, :-1]
    loss = F.cross_entropy(logits[trained].float(), targets[trained], reduction="sum")
    return loss, count, logits


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
    GRPO's rewards of the same names (train/rewards.py), so a reward and its metric cannot disagree."""
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
