"""Which training objective a run optimises, and the settings each one reads (named as TRL names them).

sft is next-token loss on the labelled answer. The preference objectives learn from pairs (or, for KTO, from
answers marked desirable or not):

- dpo (Rafailov et al. 2023): -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))));
  `loss_type` hinge: relu(1 - beta * delta); robust (Chowdhury et al. 2024): the sigmoid loss debiased for a
  `label_smoothing` share of flipped labels. A list of them, and sft (the chosen answers' NLL, their token
  mean: RPO, Pang et al. 2024), is their sum weighted by `loss_weights`, as TRL's multi-loss DPO.
- ipo (Azar et al. 2023): (delta / tokens - 1 / (2 beta))^2, delta's log-ratios per completion token, as TRL does.
- orpo (Hong et al. 2024): NLL of the chosen sequence minus beta * log sigmoid(log odds(y_w) - log odds(y_l)),
  with per-token mean log-probs; no reference.
- simpo (Meng et al. 2024): -log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - simpo_gamma); no reference;
  `cpo_alpha` > 0 adds that much NLL of the chosen answer (TRL's CPO).
- kto (Ethayarajh et al. 2024): 1 - sigmoid(beta * (log-ratio - z)) for a desirable answer and
  1 - sigmoid(beta * (z - log-ratio)) for an undesirable one, z the batch's KL estimate from mismatched pairs.

grpo (Shao et al. 2024) learns from its own samples, scored by rewards a program checks (train/grpo.py,
train/grpo_loss.py, task/rewards.py); its reference (the KL term) is used only when beta > 0.
"""

from __future__ import annotations

from typing import Any, Literal

LossType = Literal["sigmoid", "hinge", "robust", "sft", "grpo", "bnpo", "dr_grpo", "dapo"]
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo")
PAIRED = frozenset({"dpo", "ipo", "orpo", "simpo"})
REFERENCE_FREE = frozenset({"sft", "orpo", "simpo"})

# setting -> {objective: default}. A setting given for an objective not listed is an error naming its owners.
SETTINGS: dict[str, dict[str, Any]] = {
    "beta": {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1, "grpo": 0.0},
    "loss_type": {"dpo": "sigmoid", "grpo": "dapo"},
    "loss_weights": {"dpo": None},  # None: 1.0 for each loss_type
    "label_smoothing": {"dpo": 0.0, "simpo": 0.0},
    "simpo_gamma": {"simpo": 0.5},
    "cpo_alpha": {"simpo": 0.0},
    "desirable_weight": {"kto": 1.0},
    "undesirable_weight": {"kto": 1.0},
    # GRPO (TRL's defaults, but a completion of at most 128 tokens, not 512: this is a CPU-first tool)
    "num_generations": {"grpo": 8},
    "max_completion_length": {"grpo": 128},
    "temperature": {"grpo": 1.0},
    "top_p": {"grpo": 1.0},
    "epsilon": {"grpo": 0.2},
    "epsilon_high": {"grpo": None},  # None: epsilon (symmetric clipping)
    "scale_rewards": {"grpo": "group"},
    "mask_truncated_completions": {"grpo": False},
}
LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "robust", "sft"), "grpo": ("grpo", "bnpo", "dr_grpo", "dapo")}

# the data format each objective trains on
DATA_FORMATS = {"kto": ("unpaired_preference",), "grpo": ("instruction",)} | {
    o: ("preference",) for o in PAIRED
}


def misplaced_setting(objective: str, given: dict[str, Any]) -> str | None:
    """The error for the first objective setting in `given` (set, not None) that `objective` does not read."""
    for name, value in given.items():
        owners = SETTINGS.get(name)
        if value is None or owners is None or objective in owners:
            continue
        return (
            f"training.{name} belongs to objective {' / '.join(owners)}, not training.objective={objective}; "
            f"remove it or set training.objective to {' or '.join(owners)}"
        )
    return None


def resolved_settings(training: Any) -> dict[str, Any]:
    """The settings `training.objective` reads, each as given or at its default."""
    objective = training.objective
    settings = {}
    for name, owners in SETTINGS.items():
        if objective in owners:
            value = getattr(training, name)
            settings[name] = owners[objective] if value is None else value
    if objective == "grpo" and settings["epsilon_high"] is None:
        settings["epsilon_high"] = settings["epsilon"]
    return settings


def uses_reference(objective: str, beta: float | None = None) -> bool:
    """Whether the objective compares against a reference policy (the base, with adapters off); GRPO does
    when its `beta` (as resolved) is not 0."""
    if objective == "grpo":
        return bool(beta)
    return objective not in REFERENCE_FREE
