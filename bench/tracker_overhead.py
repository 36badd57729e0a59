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
import tempfile
from pathlib import Path

SCRATCH = (
    tempfile.TemporaryDirectory()
)  # Trackio's store too (it reads TRACKIO_DIR at import): not the user's
os.environ["TRACKIO_DIR"] = str(Path(SCRATCH.name) / "trackio")

from common import alternated, quickstart_step_times, step_ratio_table  # noqa: E402

ALL = ["tensorboard", "mlflow", "wandb", "trackio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with SCRATCH as tmp:

        def reporting(trackers: list[str], name: str):
            extra = ["training.checkpoint_every=null", f"report.to={trackers}", "report.project=bench"]
            return lambda r: quickstart_step_times(Path(tmp) / f"{name}-{r}", args.steps, extra)

        times = alternated({"none": reporting([], "none"), "all four": reporting(ALL, "all")}, args.rounds)
    print(step_ratio_table("report.to", times))


if __name__ == "__main__":
    main()
