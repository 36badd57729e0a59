"""Rewards the GRPO tests name as `grpo_rewards:NAME` (the tests folder is on the path)."""

from __future__ import annotations

import math


def even_tokens(prompts, completions, completion_ids):
    """The share of a completion's tokens whose id is even: dense, varied from the first step on a random model,
    and learnable (move probability onto even ids)."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def needs_topic(prompts, completions, topic):
    """Reads the data column `topic`: a row without it cannot be scored."""
    return [float(t in c) for c, t in zip(completions, topic, strict=True)]


def raises(prompts, completions):
    raise RuntimeError("the grader is down")


def nan_on_second(prompts, completions):
    return [math.nan if i == 1 else 0.0 for i in range(len(completions))]
