"""The studio's two numbers (issue 41): the runs page with 100 run folders loads in under 1 s, and a line
the trainer appends to metrics.jsonl shows on the run page's curve within 2 s.

1. 100 synthetic finished runs (a resolved config, run.json, summary.json, 500 metrics lines, data summary,
   an adapter with its provenance): GET / and GET /api/runs over HTTP from a running `deltatune studio`,
   median and max of 20 requests each.
2. Lag: a run marked as written by this (live) process; in chromium its page is open; LINES times a train
   line is appended and the time until the page's step counter shows it is measured.

    python bench/studio_pages.py [--lines 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from common import start_studio

from deltatune.task.config import validate_config
from deltatune.train.run_record import process_start

CONFIG = {
    "model": {"path": "smollm2"}, "data": {"train": "bundled:tweets", "format": "instruction"},
    "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "training": {"max_steps": 500}, "eval": {"every": 50},
}  # fmt: skip


def make_run(folder: Path, i: int, state: str = "finished", pid: int | None = None) -> None:
    folder.mkdir(parents=True)
    cfg = validate_config(CONFIG | {"output_dir": str(folder)})
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    pid = pid or 999_999_999
    (folder / "run.json").write_text(json.dumps({"pid": pid, "pid_start": process_start(pid) or "1",
                                                 "host": socket.gethostname(), "started": time.time(),
                                                 "state": state, "error": None}))  # fmt: skip
    lines = [
        {"step": s, "split": "train", "loss": 2.0 / s, "lr": 1e-3, "tokens_per_s": 900.0}
        for s in range(1, 501)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if state == "finished":
        (folder / "summary.json").write_text(json.dumps({"best_metric": 0.1 + i / 1000, "steps": 500}))
        adapter = folder / "adapter"
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        provenance = {"schema_version": 1, "environment": {"deltatune": "0.1.0", "torch": "2.13.0"},
                      "peft_type": "LORA", "data_sha256": "0" * 64}  # fmt: skip
        (adapter / "deltatune.json").write_text(json.dumps(provenance))
    (folder / "data_summary.json").write_text(json.dumps({"rows": 1000, "examples": {"train": 900}}))


def timed(url: str, times: int = 20) -> tuple[float, float]:
    seconds = []
    with httpx.Client(timeout=60) as client:
        for _ in range(times):
            tick = time.perf_counter()
            assert client.get(url).status_code == 200
            seconds.append(time.perf_counter() - tick)
    return statistics.median(seconds), max(seconds)


def lag(url: str, folder: Path, lines: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("DELTATUNE_CHROMIUM") or shutil.which("chromium")
    seen = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        page.goto(f"{url}/runs/{folder.name}")
        page.wait_for_function("() => document.getElementById('steps').textContent === '500'")
        for step in range(501, 501 + lines):
            with (folder / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, "split": "train", "loss": 0.5}) + "\n")
            tick = time.perf_counter()
            page.wait_for_function(
                f"() => document.getElementById('steps').textContent === '{step}'", polling=20
            )
            seen.append(time.perf_counter() - tick)
        browser.close()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        for i in range(100):
            make_run(root / f"group{i % 10}" / f"run{i:03d}", i)
        make_run(root / "live", 0, state="running", pid=os.getpid())
        port = 7000 + os.getpid() % 1000
        studio = start_studio(root, port)
        try:
            url = f"http://127.0.0.1:{port}"
            page, page_max = timed(url + "/")
            api, api_max = timed(url + "/api/runs")
            seen = lag(url, root / "live", args.lines)
        finally:
            studio.terminate()
            studio.wait()
    print("| measure | median (s) | max (s) |\n|---|---|---|")
    print(f"| runs page, 101 run folders | {page:.3f} | {page_max:.3f} |")
    print(f"| /api/runs, 101 run folders | {api:.3f} | {api_max:.3f} |")
    print(
        f"| appended metrics line -> on the page ({args.lines} lines) | {statistics.median(seen):.3f} | {max(seen):.3f} |"
    )


if __name__ == "__main__":
    main()
