"""One preference step: the batch's pairs (or KTO answers) scored by the model being trained and by its
reference, and the objective's loss; and the preference metrics on held-out pairs.

The reference costs no second model. For an adapter it is the same model with its adapters switched off (or,
after `training.init_adapter`, switched to a frozen copy of the adapter the run started from: a few MB), run
without gradients. A full fine-tune overwrites its base, so the reference's log-probabilities are computed once
before step 1 for every training and validation row and kept (two floats a row), as TRL's
`precompute_ref_log_probs` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core.adapters import activated, all_wrappers, disable_adapter
from ..core.input_hooks import rewrites_inputs
from ..core.modes import eval_mode
from ..data.formats import Example
from ..task.objectives import uses_reference
from .answer_logps import AnswerBatch, answer_log_probs, collate_answers
from .preference_loss import PreferenceOutput, preference_loss

REFERENCE_ADAPTER = "reference"  # the frozen copy of training.init_adapter


def kto_partners(n: int, batch_size: int) -> list[int]:
    """The row whose answer follows row i's prompt in KTO's KL estimate: the previous row within each block of
    `batch_size` rows in dataset order (TRL's rotation), fixed per row so a reference can be precomputed."""
    partners = []
    for i in range(n):
        start = i - i % batch_size
        size = min(batch_size, n - start)
        partners.append(start + (i - start - 1) % size)
    return partners


class PreferenceObjective:
    def __init__(
        self, objective: str, settings: dict[str, Any], *, pad_id: int, batch_size: int, prompt_once: bool,
        precompute: bool, train: list[Example], validation: list[Example],
    ) -> None:  # fmt: skip
        """`prompt_once`: run each prompt once per pair (the caller knows whether the model may keep a cache
        between two forwards); `precompute`: keep the reference's log-probs from before step 1 (full)."""
        self.objective, self.settings, self.pad_id = objective, settings, pad_id
        self.prompt_once, self.precompute = prompt_once, precompute
        self.splits = {"train": train, "validation": validation}
        self.partners = {
            name: kto_partners(len(rows), batch_size) if objective == "kto" else None
            for name, rows in self.splits.items()
        }
        self.kept: dict[str, torch.Tensor] = {}  # split -> (rows, answers per prompt) reference log-probs

    def batch(self, split: str, indices: list[int]) -> AnswerBatch:
        rows = self.splits[split]
        partners = self.partners[split]
        mates = None if partners is None else [rows[partners[i]] for i in indices]
        return collate_answers([rows[i] for i in indices], self.pad_id, mates)

    @torch.no_grad()
    def keep_reference(self, model: nn.Module, device: torch.device, batch_size: int) -> None:
        """Before step 1 of a full fine-tune: the model is still the base; score every row once."""
        if not uses_reference(self.objective):
            return
        with eval_mode(model):
            for split, rows in self.splits.items():
                parts = [torch.zeros(0, 2)]
                for start in range(0, len(rows), batch_size):
                    indices = list(range(start, min(start + batch_size, len(rows))))
                    scores = answer_log_probs(
                        model, self.batch(split, indices).to(device), prompt_once=self.prompt_once
                    )
                    parts.append(scores.logps.float().view(-1, len(indices)).t().cpu())
                self.kept[split] = torch.cat(parts)

    def reference_logps(
        self, model: nn.Module, batch: AnswerBatch, split: str, indices: list[int]
    ) -> torch.Tensor | None:
        if not uses_reference(self.objective):
            return None
        if self.precompute:
            return self.kept[split][indices].t().reshape(-1).to(batch.answer_ids.device)
        with torch.no_grad(), reference_of(model):
            return answer_log_probs(model, batch, prompt_once=self.prompt_once).logps.detach()

    def loss(
        self, model: nn.Module, split: str, indices: list[int], device: torch.device
    ) -> PreferenceOutput:
        return self.loss_and_tokens(model, split, indices, device)[0]

    def loss_and_tokens(
        self, model: nn.Module, split: str, indices: list[int], device: torch.device
    ) -> tuple[PreferenceOutput, int]:
        """The objective's output on these rows, and how many tokens (each prompt once, the answers) they hold."""
        batch = self.batch(split, indices).to(device)
        reference = self.reference_logps(model, batch, split, indices)
        policy = answer_log_probs(
            model, batch, prompt_once=self.prompt_once, prompt_nll=self.objective == "orpo"
        )
        out = preference_loss(self.objective, self.settings, policy, reference, batch.desirable)
        return out, batch.tokens()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, batch_size: int, limit: int | None) -> dict:
        """On the validation rows: the mean loss, the share of pairs whose implicit reward prefers the chosen
        answer (reward_accuracy) and the mean reward margin; for KTO, the share of answers whose reward has the
        sign of their label, and the mean desirable minus the mean undesirable reward."""
        rows = len(self.splits["validation"][:limit])
        total, chosen, rejected = 0.0, [], []
        with eval_mode(model):
            for start in range(0, rows, batch_size):
                indices = list(range(start, min(start + batch_size, rows)))
                out = self.loss(model, "validation", indices, device)
                total += float(out.loss) * len(indices)
                chosen.append(out.chosen_rewards.float().cpu())
                rejected.append(out.rejected_rewards.float().cpu())
        good, bad = torch.cat(chosen), torch.cat(rejected)
        metrics = {"loss": total / max(rows, 1)}
        if self.objective == "kto":
            right = int((good > 0).sum() + (bad < 0).sum())
            metrics["reward_accuracy"] = right / max(len(good) + len(bad), 1)
            metrics["reward_margin"] = _mean(good) - _mean(bad)
        else:
            metrics["reward_accuracy"] = float((good > bad).float().mean())
            metrics["reward_margin"] = float((good - bad).mean())
        metrics["rewards_chosen"], metrics["rewards_rejected"] = _mean(good), _mean(bad)
        return metrics


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if len(values) else 0.0


@contextlib.contextmanager
def reference_of(model: nn.Module) -> Iterator[None]:
    """Inside the block the model is its reference: the frozen starting adapter where the run has one, else
    the base with every adapter off."""
    inner = getattr(model, "module", model)
    wrappers = [w for _, w in all_wrappers(inner)]
    if any(REFERENCE_ADAPTER in w.adapter_names for w in wrappers):
        with activated(wrappers, REFERENCE_ADAPTER):
            yield
        return
    with disable_adapter(inner):
        yield


def prompt_once_unavailable(cfg: Any, model: nn.Module, distributed: bool) -> str | None:
    """Why the pairs' prompts must run once per answer (None: once per pair)."""
    if distributed:
        return "DDP and FSDP take one forward call per backward"
    if cfg.training.gradient_checkpointing:
        return "gradient checkpointing recomputes the forward, which cannot keep the prompt's cache"
    if rewrites_inputs(model):
        return "virtual tokens come before the prompt"
    if not hasattr(model, "config"):
        return "the model is not a transformers model that takes a KV cache"
    return None
