"""What logging to the experiment trackers costs a training step (issue 41: at most 2% with all four at once).

The quickstart's config (the bundled SmolLM2-135M on the bundled tweets) trains STEPS steps logging every step,
once with `report.to: []` and once with all four trackers (TensorBoard, MLflow, W&B offline, Trackio), in one
process, alternating which goes first, ROUNDS times. Reported: the median step time and the whole loop's time
per step (evaluations and logging included), each variant's median over rounds, and the ratio.

    python bench/tracker_overhead.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

SCRATCH = (
    tempfile.TemporaryDirectory()
)  # Trackio's store too (it reads TRACKIO_DIR at import): not the user's
os.environ["TRACKIO_DIR"] = str(Path(SCRATCH.name) / "trackio")

from deltatune.train import load_train_config, train  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
ALL = ["tensorboard", "mlflow", "wandb", "trackio"]


def run_once(folder: Path, steps: int, trackers: list[str]) -> tuple[float, float]:
    overrides = [
        f"training.max_steps={steps}", "training.log_every=1", "training.progress=false",
        "training.checkpoint_every=null", "eval.generate_metrics=[]", "eval.metric=loss", f"output_dir={folder}",
        f"report.to={trackers}", "report.project=bench",
    ]  # fmt: skip
    result = train(load_train_config(CONFIG, overrides))
    return result.seconds_per_step, result.train_seconds / result.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {"none": [], "all four": []}
    with SCRATCH as tmp:
        for round_ in range(args.rounds):
            order = [("none", []), ("all four", ALL)]
            for name, trackers in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(
                    run_once(Path(tmp) / f"{name}-{round_}".replace(" ", "-"), args.steps, trackers)
                )
                print(f"round {round_} {name}: {times[name][-1][0]:.3f} s/step (median), "
                      f"{times[name][-1][1]:.3f} s/step (loop)", file=sys.stderr, flush=True)  # fmt: skip
    base_step = statistics.median(t[0] for t in times["none"])
    base_loop = statistics.median(t[1] for t in times["none"])
    print("| report.to | median step (s) | loop per step (s) | step / none | loop / none |")
    print("|---|---|---|---|---|")
    for name, runs in times.items():
        step, loop = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
        print(f"| {name} | {step:.4f} | {loop:.4f} | {step / base_step:.3f} | {loop / base_loop:.3f} |")


if __name__ == "__main__":
    main()
