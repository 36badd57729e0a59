"""Rows of a batch that open with the same tokens (a chat template, a system prompt, an instruction) run those
tokens once: the shared prefix goes through the model as one row, its KV cache is expanded (a view, not a copy)
to every row, and the rest of each row attends to it. Gradients from every row flow back through the expanded
cache into the one prefix forward, so the loss and the gradients are those of the full batch, up to float
summation order; the forward and backward work of the prefix is paid once instead of once per row.

Only the prefix that carries no label and no padding is shared, so every labelled position keeps its logits.
With dropout in the adapter (lora_dropout > 0) the rows also share the prefix's dropout mask, where the plain
path draws one per row: the same expectation, a little less noise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..core.adapters import adapter_configs
from ..core.capabilities import Capability, capability_refusal, method_refusal
from ..core.kv_cache import cache_argument
from ..data.formats import IGNORE

MIN_SHARED = 8  # tokens: below this the second forward call costs more than it saves


def unavailable(cfg: Any, distributed: bool) -> str | None:
    """Why a run configured with `training.shared_prefix` must run without it (None: it can use it)."""
    if cfg.model.task == "classification":
        return "a classifier scores each row whole"
    if cfg.training.gradient_checkpointing:
        return "gradient checkpointing recomputes the forward, which cannot keep the prefix's cache"
    if not cfg.adapter.full and (
        reason := method_refusal(cfg.adapter.method.upper(), Capability.SHARE_PREFIX)
    ):
        return reason
    if distributed:
        return "DDP and FSDP take one forward call per backward"
    if cfg.training.kl_penalty and cfg.training.kl_penalty_prompts:
        return "training.kl_penalty scores every position of each row with the model and its base"
    return None


def shares_in_evaluation(cfg: Any, model: nn.Module) -> bool:
    """Whether scoring `model` on `cfg`'s task (deltatune eval, compare) shares the prefix: when the config asks
    for it and the adapters the model carries allow it. One that puts virtual tokens in front does not; what
    counts is the adapter loaded, whatever method the config names."""
    refused = any(capability_refusal(c, Capability.SHARE_PREFIX) for c in adapter_configs(model).values())
    return cfg.training.shared_prefix and cfg.model.task != "classification" and not refused


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row of `batch` shares, unpadded and unlabelled, less one: the last shared
    token stays in the rows, so the logits that predict the first labelled token come from the row forward.
    0 when the rows share too little to pay for a second forward call."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0) & mask.bool().all(dim=0) & (labels == IGNORE).all(dim=0)
    differing = (~same).nonzero()
    common = int(differing[0]) if len(differing) else ids.shape[1]
    shared = common - 1
    return shared if shared >= MIN_SHARED else 0


def prefix_cache(model: nn.Module, prefix: torch.Tensor, rows: int) -> dict[str, Any]:
    """Run `prefix` (1, P) through the model and return the forward arguments that let `rows` rows continue
    from it: the cache, expanded to every row, under the name this transformers version takes."""
    cache = DynamicCache()
    model(input_ids=prefix, **{cache_argument(model): cache}, use_cache=True)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    return {cache_argument(model): cache, "use_cache": True}


def continuation(
    model: nn.Module, batch: dict[str, torch.Tensor], shared: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The batch without its first `shared` tokens, and the extra forward arguments (the prefix's cache,
    positions that continue after it, the attention mask over prefix and rest) that make its logits those of
    the full rows."""
    ids = batch["input_ids"]
    rows, width = ids.shape
    extra = prefix_cache(model, ids[:1, :shared], rows)
    extra["position_ids"] = torch.arange(shared, width, device=ids.device).expand(rows, -1)
    rest = {"input_ids": ids[:, shared:], "labels": batch["labels"][:, shared:]}
    return rest, extra
