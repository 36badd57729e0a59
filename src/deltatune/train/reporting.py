"""What a run leaves for people: metrics.jsonl (one JSON object per log or eval event), a progress bar with
loss, tokens/s and ETA, and curves.png at the end."""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.atomic import atomic_path, write_text_atomic


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.listener: Callable[[dict[str, Any]], None] | None = None  # the trackers hear every event

    def truncate_after(self, step: int) -> None:
        """On resume, drop events from steps the resumed run will redo."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.listener is not None:
                self.listener(record)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


TRAIN_PANELS = {  # what a GRPO run logs per step, each drawn against the step when present
    "reward": "mean reward of the step's samples",
    "completion_length": "completion tokens (mean)",
    "kl": "KL(policy || reference), nats/token",
    "clip_ratio/region": "share of tokens clipped",
}


def plot_curves(records: list[dict[str, Any]], path: Path, metric: str) -> Path | None:
    """Training loss and validation loss against the optimizer step; beside it the validation metric, the
    forgetting monitor's KL when the run had one, and a GRPO run's reward (each reward function's too),
    completion length, KL and clipped share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "validation"]
    if not train and not evals:
        return None
    panels = [key for key in (metric, "forgetting_kl") if key != "loss" and any(key in r for r in evals)]
    steps = [key for key in TRAIN_PANELS if any(key in r for r in train)]
    count = 1 + len(panels) + len(steps)
    fig, axes = plt.subplots(1, count, figsize=(6 + 5 * (count - 1), 4), squeeze=False)
    loss_ax = axes[0][0]
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.8)
    if any("loss" in r for r in evals):
        shown = [r for r in evals if "loss" in r]
        loss_ax.plot([r["step"] for r in shown], [r["loss"] for r in shown], "o-", label="validation loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    for ax, key in zip(axes[0][1:], panels, strict=False):
        ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel(
            "KL(base || model) on general text, nats/token" if key == "forgetting_kl" else f"validation {key}"
        )
    for ax, key in zip(axes[0][1 + len(panels) :], steps, strict=True):
        functions = sorted({k for r in train for k in r if key == "reward" and k.startswith("reward/")})
        shown = [key] + (functions if len(functions) > 1 else [])  # one reward: its curve is the total's
        for name in shown:
            ax.plot(
                [r["step"] for r in train if name in r], [r[name] for r in train if name in r], label=name
            )
        ax.set_xlabel("step")
        ax.set_ylabel(TRAIN_PANELS[key])
        if len(shown) > 1:
            ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
