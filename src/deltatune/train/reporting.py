"""What a run leaves for people: metrics.jsonl (one JSON object per log or eval event), a progress bar with
loss, tokens/s and ETA, and curves.png at the end."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.atomic import atomic_path, write_text_atomic


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

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


def plot_curves(records: list[dict[str, Any]], path: Path, metric: str) -> Path | None:
    """Training loss and validation loss against the optimizer step; beside it the validation metric, and
    the forgetting monitor's KL when the run had one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "validation"]
    if not train and not evals:
        return None
    panels = [key for key in (metric, "forgetting_kl") if key != "loss" and any(key in r for r in evals)]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 5 * len(panels), 4), squeeze=False)
    loss_ax = axes[0][0]
    if train:
        loss_ax.plot(*zip(*train, strict=True), label="train loss", alpha=0.8)
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    for ax, key in zip(axes[0][1:], panels, strict=True):
        ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel(
            "KL(base || model) on general text, nats/token" if key == "forgetting_kl" else f"validation {key}"
        )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
