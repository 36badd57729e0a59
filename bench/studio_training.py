"""Training with the studio open is no slower (issue 41): the quickstart's config trains STEPS steps once with
nothing watching and once with `deltatune studio` running over its folder and chromium showing the run's page
(which reads metrics.jsonl every second), alternating which goes first, ROUNDS times, in one process; the
studio and the browser are their own processes on the same cores.

    python bench/studio_training.py [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import alternated, quickstart_step_times, start_studio, step_ratio_table

VIEWER = """
import sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    page = p.chromium.launch(executable_path=sys.argv[1]).new_page()
    page.goto(sys.argv[2])
    print("open", flush=True)
    sys.stdin.read()
"""


def watched(root: Path, name: str, steps: int) -> tuple[float, float]:
    port = 7000 + os.getpid() % 1000
    studio = start_studio(root, port)
    viewer = None
    try:
        chromium = os.environ.get("DELTATUNE_CHROMIUM") or shutil.which("chromium")
        viewer = subprocess.Popen(
            [sys.executable, "-c", VIEWER, chromium, f"http://127.0.0.1:{port}/runs/{name}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert viewer.stdout.readline().strip() == "open"
        return quickstart_step_times(root / name, steps)
    finally:
        if viewer is not None:
            viewer.communicate("")
        studio.terminate()
        studio.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        times = alternated(
            {
                "nothing open": lambda r: quickstart_step_times(root / f"r{r}-plain", args.steps),
                "studio + page open": lambda r: watched(root, f"r{r}-watched", args.steps),
            },
            args.rounds,
        )
    print(step_ratio_table("while training", times))


if __name__ == "__main__":
    main()
