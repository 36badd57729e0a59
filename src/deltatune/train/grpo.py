"""One GRPO step on the live adapter: sample G completions of each prompt, score them with the rewards,
normalise the rewards within each prompt's group, and train on the clipped policy loss (train/grpo_loss.py).

Nothing is copied or synced. The completions come from deltatune's own decode engine (`runtime.generate`:
continuous batching on the engine for LoRA, transformers' generate for the methods the engine cannot batch)
running the very model being trained, adapter live, in eval mode; the reference for the KL term (beta > 0) is
the same model with its adapters off (or the frozen copy of `training.init_adapter`), without gradients.

Every completion has its own sampling seed, a function of the run's seed, the step, the data row and the
sample's index: a resumed run draws exactly the completions the uninterrupted run drew, with no generator state
to save, and a row's samples do not depend on what it was batched with.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.adapters import adapter_in_use
from ..core.modes import eval_mode
from ..data.formats import Example
from ..runtime.generate import generate
from ..runtime.mixed import mixable_refusal
from ..runtime.sampling import Completion, Sampling, end_of_sequence_ids
from ..task.metrics import answer_metrics
from ..task.rewards import Reward, score
from .answer_logps import AnswerBatch, answer_log_probs, right_padded
from .grpo_loss import GRPOOutput, group_advantages, grpo_loss
from .preference import reference_of


def rollout_seed(seed: int, step: int, row: int, sample: int) -> int:
    """The sampling seed of one completion: stable across runs, resumes and batch compositions."""
    digest = hashlib.blake2b(f"{seed}:{step}:{row}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Rollout:
    """A step's completions on this rank, G consecutive per prompt, in the order of the step's rows."""

    rows: list[int]  # data row per prompt
    prompt_ids: list[list[int]]  # per prompt
    completion_ids: list[list[int]]  # per completion; ends with its end-of-sequence token when it stopped
    truncated: list[bool]  # per completion: cut at max_completion_length
    advantages: torch.Tensor  # (completions,)
    metrics: dict[str, float]

    def tokens(self, prompts: range) -> int:
        """Prompt and completion tokens of these prompts' part (for tokens/s)."""
        group = len(self.completion_ids) // max(len(self.rows), 1)
        prompt = sum(len(self.prompt_ids[i]) for i in prompts)
        return prompt + sum(len(self.completion_ids[j]) for i in prompts for j in _group(i, group))


def _group(prompt: int, group: int) -> range:
    return range(prompt * group, (prompt + 1) * group)


class GRPOObjective:
    def __init__(
        self, settings: dict[str, Any], rewards: list[Reward], tokenizer: Any, *, train: list[Example],
        validation: list[Example], seed: int, prompt_once: bool, distributed: bool,
    ) -> None:  # fmt: skip
        """`prompt_once`: score each prompt's G completions with the prompt run once (train/answer_logps.py)."""
        self.settings, self.rewards, self.tokenizer = settings, rewards, tokenizer
        self.splits = {"train": train, "validation": validation}
        self.seed, self.prompt_once, self.distributed = seed, prompt_once, distributed
        self.group = settings["num_generations"]
        self._said_fallback = False

    # --- sampling and scoring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self, model: nn.Module, step: int, rows: list[int], autocast: Callable[[], AbstractContextManager]
    ) -> Rollout:
        """Sample G completions of each row's prompt with the model as it is now, and score them."""
        s, g = self.settings, self.group
        examples = [self.splits["train"][r] for r in rows]
        prompts = [e.prompt_ids for e in examples for _ in range(g)]
        seeds = [rollout_seed(self.seed, step, r, k) for r in rows for k in range(g)]
        completions = self._sample(
            model, prompts, seeds=seeds, temperature=s["temperature"], top_p=s["top_p"],
            max_new_tokens=s["max_completion_length"], autocast=autocast,
        )  # fmt: skip
        return self.judge(rows, completions)

    def judge(self, rows: list[int], completions: list[Completion]) -> Rollout:
        """Score the G completions of each row's prompt (G consecutive per row) and turn the rewards into
        advantages: everything of a step but the sampling (the TRL oracle test gives fixed completions here)."""
        s, g = self.settings, self.group
        examples = [self.splits["train"][r] for r in rows]
        ids = [c.tokens + ([c.stop_token] if c.stop_token is not None else []) for c in completions]
        table = self._score(examples, g, completions, ids, "train", rows)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        per_function = torch.tensor(table, dtype=torch.float64)
        rewards = (per_function * weights).sum(1)
        gathered = self._all_ranks(rewards)
        advantages, flat = group_advantages(gathered, g, s["scale_rewards"])
        if len(gathered) > len(rewards):  # this rank's part of the gathered batch
            rank, size = dist.get_rank(), len(rewards)
            advantages = advantages[rank * size : (rank + 1) * size]
        metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, g).std(1).mean()) if g > 1 else 0.0,
            "frac_reward_zero_std": float(flat),
            "completion_length": sum(map(len, ids)) / len(ids),
            "clipped_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
        }
        for k, reward in enumerate(self.rewards):
            metrics[f"reward/{reward.name}"] = float(per_function[:, k].mean())
        truncated = [c.stop_token is None for c in completions]
        return Rollout(rows, [e.prompt_ids for e in examples], ids, truncated, advantages.float(), metrics)

    def _sample(
        self, model: nn.Module, prompts: list[list[int]], *, seeds: list[int] | None, temperature: float,
        top_p: float, max_new_tokens: int, autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> list[Completion]:  # fmt: skip
        inner = getattr(model, "module", model)
        adapter = adapter_in_use(inner)
        self._say_fallback(inner, adapter)
        with eval_mode(inner), autocast():
            return generate(
                inner, prompts, [adapter] * len(prompts), max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=end_of_sequence_ids(inner, self.tokenizer),
                sampling=Sampling(temperature=temperature, top_p=top_p), seeds=seeds,
            )  # fmt: skip

    def _say_fallback(self, model: nn.Module, adapter: str | None) -> None:
        """Once per run: why the rollouts are not on the decode engine, where they are not."""
        if self._said_fallback or adapter is None:
            return
        self._said_fallback = True
        why = mixable_refusal(model, adapter)
        if why and (not self.distributed or not dist.is_initialized() or dist.get_rank() == 0):
            print(
                f"GRPO samples through transformers' generate, not the decode engine: {why}", file=sys.stderr
            )

    def _score(
        self, examples: list[Example], g: int, completions: list, ids: list[list[int]], split: str,
        rows: list[int],
    ) -> list[list[float]]:  # fmt: skip
        decode = self.tokenizer.decode
        prompts = [decode(e.prompt_ids, skip_special_tokens=True) for e in examples for _ in range(g)]
        texts = [decode(c.tokens, skip_special_tokens=True) for c in completions]
        fields = [reward_fields(e) for e in examples for _ in range(g)]

        def where(i: int) -> str:
            row = fields[i]
            origin = (
                f"{row['__file__']} line {row['__line__']}" if "__line__" in row else f"row {rows[i // g]}"
            )
            return f"{split} data {origin}"

        return score(self.rewards, prompts, texts, fields, ids, where)

    def _all_ranks(self, rewards: torch.Tensor) -> torch.Tensor:
        """Every rank's rewards, for scale_rewards: batch (a group never spans ranks: the group std is local)."""
        if not (self.distributed and dist.is_initialized()) or self.settings["scale_rewards"] != "batch":
            return rewards
        parts = [torch.zeros_like(rewards) for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, rewards)
        return torch.cat(parts)

    # --- the loss ------------------------------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, rollout: Rollout, prompts: range, device: torch.device,
        dapo_tokens: float | None = None,
    ) -> GRPOOutput:  # fmt: skip
        """The loss on these prompts' completions of the rollout."""
        s, g = self.settings, self.group
        batch = self._batch(rollout, prompts).to(device)
        order = _group_major(len(prompts), g).to(device)  # answer rows are sample-major in an AnswerBatch
        temperature = s["temperature"]
        policy = answer_log_probs(
            model, batch, prompt_once=self.prompt_once, per_token=True, temperature=temperature
        )
        logps = policy.token_logps[order]
        reference = None
        if s["beta"] != 0.0:
            with torch.no_grad(), reference_of(model):
                scored = answer_log_probs(
                    model, batch, prompt_once=self.prompt_once, per_token=True, temperature=temperature
                )
            reference = scored.token_logps[order].detach()
        mask = batch.answer_mask[order]
        completions = [j for i in prompts for j in _group(i, g)]
        if s["mask_truncated_completions"]:
            kept = torch.tensor([not rollout.truncated[j] for j in completions], device=device)
            mask = mask * kept[:, None]
        return grpo_loss(
            logps, logps.detach(), reference, rollout.advantages[completions].to(device), mask,
            loss_type=s["loss_type"], beta=s["beta"], epsilon=s["epsilon"], epsilon_high=s["epsilon_high"],
            max_completion_length=s["max_completion_length"], dapo_tokens=dapo_tokens,
        )  # fmt: skip

    def _batch(self, rollout: Rollout, prompts: range) -> AnswerBatch:
        g = self.group
        prompt_ids, prompt_mask = right_padded(
            [rollout.prompt_ids[i] for i in prompts], self.tokenizer.pad_token_id
        )
        answers = [rollout.completion_ids[i * g + k] for k in range(g) for i in prompts]
        answer_ids, answer_mask = right_padded(answers, self.tokenizer.pad_token_id)
        return AnswerBatch(prompt_ids, prompt_mask, answer_ids, answer_mask)

    # --- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, spec: Any, autocast: Callable[[], AbstractContextManager] = nullcontext
    ) -> dict[str, float]:
        """On the first `eval.generate_samples` validation rows: one greedy completion each (eval.max_new_tokens),
        its mean weighted reward and each reward's mean, and the generation metrics the eval section lists."""
        examples = self.splits["validation"][: spec.generate_samples]
        metrics: dict[str, float] = {}
        completions = []
        for start in range(0, len(examples), spec.batch_size):
            part = examples[start : start + spec.batch_size]
            completions += self._sample(
                model, [e.prompt_ids for e in part], seeds=None, temperature=0.0, top_p=1.0,
                max_new_tokens=spec.max_new_tokens, autocast=autocast,
            )  # fmt: skip
        ids = [c.tokens + ([c.stop_token] if c.stop_token is not None else []) for c in completions]
        table = torch.tensor(
            self._score(examples, 1, completions, ids, "validation", list(range(len(examples)))),
            dtype=torch.float64,
        )
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float64)
        metrics["reward"] = float((table * weights).sum(1).mean())
        for k, reward in enumerate(self.rewards):
            metrics[f"reward/{reward.name}"] = float(table[:, k].mean())
        if spec.generate_metrics:
            answers = [self.tokenizer.decode(c.tokens, skip_special_tokens=True).strip() for c in completions]
            metrics |= answer_metrics(answers, [e.reference or "" for e in examples], spec.generate_metrics)
        return metrics


def _group_major(prompts: int, group: int) -> torch.Tensor:
    """Row r of an AnswerBatch continues prompt r % B (sample-major); completion i * G + k is its row k * B + i."""
    return torch.tensor([k * prompts + i for i in range(prompts) for k in range(group)], dtype=torch.long)


def reward_fields(example: Example) -> dict[str, Any]:
    """What a reward sees of a data row: its columns, and `reference`, its expected answer as rendered."""
    return {**(example.fields or {}), "reference": example.reference}
