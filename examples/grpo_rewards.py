"""A reward of one's own for `deltatune train examples/grpo.yaml` (examples/README §12): the json_match rule, with
each tweet's reward weighted by the inverse of its class's share of the 2,000 training tweets, so the expected
reward is the mean recall over the three classes rather than plain accuracy. Plain accuracy under sampling is
raised fastest by answering the most common class more often, which is how GRPO with json_match moved the
quickstart adapter's answers towards "negative" (§12).

    PYTHONPATH=examples deltatune train examples/grpo.yaml \
      'training.rewards=[{name: "grpo_rewards:balanced_json_match"}]'
"""

from __future__ import annotations

from deltatune.task.rewards import json_match

# the quickstart's training split: 851 negative, 800 neutral, 349 positive tweets
TRAINING_COUNTS = {"negative": 851, "neutral": 800, "positive": 349}
WEIGHTS = {label: sum(TRAINING_COUNTS.values()) / (3 * n) for label, n in TRAINING_COUNTS.items()}


def balanced_json_match(
    prompts: list[str], completions: list[str], reference: list[str], sentiment: list[str]
):
    """json_match x the weight of the tweet's labelled class (its `sentiment` column)."""
    matches = json_match(prompts, completions, reference)
    return [m * WEIGHTS[label] for m, label in zip(matches, sentiment, strict=True)]
