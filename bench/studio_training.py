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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from deltatune.train import load_train_config, train

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
VIEWER = """
import sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    page = p.chromium.launch(executable_path=sys.argv[1]).new_page()
    page.goto(sys.argv[2])
    print("open", flush=True)
    sys.stdin.read()
"""


def run_once(folder: Path, steps: int) -> tuple[float, float]:
    overrides = [
        f"training.max_steps={steps}", "training.log_every=1", "training.progress=false",
        "eval.generate_metrics=[]", "eval.metric=loss", f"output_dir={folder}",
    ]  # fmt: skip
    result = train(load_train_config(CONFIG, overrides))
    return result.seconds_per_step, result.train_seconds / result.steps


def watched(root: Path, name: str, steps: int) -> tuple[float, float]:
    port = 7000 + os.getpid() % 1000
    studio = subprocess.Popen(
        [sys.executable, "-m", "deltatune", "studio", "--runs", str(root), "--port", str(port)]
    )
    viewer = None
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=60).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        chromium = os.environ.get("DELTATUNE_CHROMIUM") or shutil.which("chromium")
        viewer = subprocess.Popen(
            [sys.executable, "-c", VIEWER, chromium, f"http://127.0.0.1:{port}/runs/{name}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert viewer.stdout.readline().strip() == "open"
        return run_once(root / name, steps)
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
    times: dict[str, list[tuple[float, float]]] = {"nothing open": [], "studio + page open": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for round_ in range(args.rounds):
            order = ["nothing open", "studio + page open"]
            for variant in order if round_ % 2 == 0 else order[::-1]:
                name = f"r{round_}-{'watched' if 'studio' in variant else 'plain'}"
                if "studio" in variant:
                    times[variant].append(watched(root, name, args.steps))
                else:
                    times[variant].append(run_once(root / name, args.steps))
                print(f"round {round_} {variant}: {times[variant][-1]}", file=sys.stderr, flush=True)
    base_step = statistics.median(t[0] for t in times["nothing open"])
    base_loop = statistics.median(t[1] for t in times["nothing open"])
    print("| while training | median step (s) | loop per step (s) | step / nothing | loop / nothing |")
    print("|---|---|---|---|---|")
    for variant, runs in times.items():
        step, loop = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
        print(f"| {variant} | {step:.4f} | {loop:.4f} | {step / base_step:.3f} | {loop / base_loop:.3f} |")


if __name__ == "__main__":
    main()
