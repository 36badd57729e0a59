"""The curves of examples/README §11's preference runs: held-out accuracy at the start and at each evaluation,
and the implicit rewards (log-ratios to the reference) the DPO runs logged on their training batches. Reads
each run's metrics.jsonl (run §11's commands first) and writes examples/preference_curves.png.

    python examples/preference_curves.py [--runs outputs/preference] [--start 0.690]

--start is the SFT adapter's accuracy on the same held-out pairs (§11: 69.0% on 306 tweets), plotted at step 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = {"dpo": "DPO", "rpo": "DPO + NLL of the chosen", "orpo": "ORPO", "sft": "SFT continued (control)"}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("outputs/preference"))
    parser.add_argument("--start", type=float, default=0.690)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "preference_curves.png")
    args = parser.parse_args()
    figure, (accuracy, chosen, margin) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run, label in RUNS.items():
        records = _records(args.runs / run / "metrics.jsonl")
        held_out = [
            (r["step"], r["json_match"]) for r in records if r["split"] == "validation" and "json_match" in r
        ]
        steps, values = zip(*[(0, args.start), *held_out], strict=True)
        accuracy.plot(steps, [100 * v for v in values], marker="o", label=label)
        trained = [r for r in records if r["split"] == "train" and "rewards_chosen" in r]
        if trained and run != "orpo":  # ORPO's reward is a mean log-prob, not a log-ratio to a reference
            chosen.plot([r["step"] for r in trained], [r["rewards_chosen"] for r in trained], label=label)
            margin.plot([r["step"] for r in trained], [r["reward_margin"] for r in trained], label=label)
    accuracy.axhline(100 * args.start, color="grey", linestyle=":", linewidth=1)
    accuracy.set(title="held-out json_match (%)", xlabel="step")
    chosen.axhline(0, color="grey", linestyle=":", linewidth=1)
    chosen.set(title="chosen answers' reward (training batches)", xlabel="step")
    margin.set(title="reward margin, chosen - rejected (training batches)", xlabel="step")
    for axes in (accuracy, chosen, margin):
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
