"""The task loss: next-token cross-entropy on the labelled tokens of a causal LM, or the classifier's
cross-entropy, summed so that evaluation weights every token equally. Training, evaluation and the sweep's
trials all score a model with this one function."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.head_input import contiguous_head_input
from ..data.formats import IGNORE
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
    model allows it (`fuse_head`, task/head_loss.py) the output head and the loss run together, in chunks,
    on the labelled positions only, and no logits are returned. Otherwise, with masked prompts the labelled
    positions are a short tail, so when the model takes `logits_to_keep` (transformers causal LMs do) the head
    runs on that tail only (`trim_logits`): for SmolLM2 the head is a fifth of the forward FLOPs, and the fp32
    logits of a full eval batch were gigabytes. The loss is the same on every path (tested).

    `share_prefix`: the leading tokens all rows share run once (task/shared_prefix.py); the logits returned
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
        with contiguous_head_input(model):
            logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - first, **extra).logits
        targets, trained = targets[:, first:], trained[:, first:]
    else:
        logits = model(input_ids=ids, **extra).logits
    logits = logits[:, :-1]
    loss = F.cross_entropy(logits[trained].float(), targets[trained], reduction="sum")
    return loss, count, logits
