"""What starting a sweep trial costs (issue 43): a trial forked from the fork server that imported torch,
transformers and the trainer once, against a trial in a fresh interpreter (`python -m deltatune.sweep.worker`),
alternating, in one process. The trial's config names a data file that does not exist, so each trainer starts,
reads its config, loads the tokenizer, fails at the data and records why: the time measured is the start,
nothing of the training. The fork server's own start (its imports, once per sweep) is measured apart.

    python bench/sweep_trial_start.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from deltatune.sweep.trial import TrainerProcess
from deltatune.sweep.worker import ERROR_FILE


def trial(folder: Path, fork_server: bool) -> float:
    folder.mkdir(parents=True)
    config = {
        "model": {"path": "smollm2", "task": "causal_lm"},
        "data": {"train": str(folder / "missing.jsonl"), "format": "instruction"},
        "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "training": {"max_steps": 1},
        "output_dir": str(folder),
    }
    (folder / "trial.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    process = TrainerProcess(folder / "trial.yaml", folder / "train.log", dict(os.environ), fork_server)
    process.wait(None)
    elapsed = time.perf_counter() - start
    reason = json.loads((folder / ERROR_FILE).read_text())["message"]
    assert process.returncode == 1 and "missing.jsonl does not exist" in reason, (process.returncode, reason)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first = trial(tmp / "first", fork_server=True)  # starts the server: its imports happen here, once
        times: dict[str, list[float]] = {"fresh interpreter": [], "fork server": []}
        for r in range(args.rounds):
            order = ["fresh interpreter", "fork server"][:: 1 if r % 2 == 0 else -1]
            for name in order:
                times[name].append(trial(tmp / f"{name.replace(' ', '-')}-{r}", name == "fork server"))
    base = statistics.median(times["fresh interpreter"])
    print(f"first trial (starts the fork server): {first:.3f} s")
    print("| trial start | median (s) | min (s) | max (s) | / fresh interpreter |")
    print("|---|---|---|---|---|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {median:.3f} | {min(runs):.3f} | {max(runs):.3f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
