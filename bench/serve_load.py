"""Load test of `deltatune serve` on loopback: N concurrent clients send a fixed number of completion
requests spread over M adapters; reports throughput, latency percentiles and errors (which must be zero).

The base is the bundled SmolLM2-135M-Instruct; the M adapters are LoRA r=16 on all linear layers with random
(non-zero) weights, saved against that base. The server runs as its own process, as in production. With
`--modes continuous fixed` two servers run side by side, one with continuous batching (the default) and one
with `--fixed-batches`, and each load is sent to one then the other. `--max-tokens 8 32` cycles the
requests' max_tokens, as real traffic mixes short and long answers.

python bench/serve_load.py --clients 1 16 --adapters 8 --requests 64 --max-tokens 16
python bench/serve_load.py --clients 16 --adapters 8 --requests 64 --max-tokens 4 32 --modes continuous fixed
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

import deltatune as dt

PROMPTS = [
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three colours.",
    "Say hello in Spanish.",
    "Why is the sky blue?",
    "Name a prime number larger than ten.",
]


def make_adapters(root: Path, count: int) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.models.loading import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), dtype=torch.float32)
    for i in range(count):
        torch.manual_seed(i)
        config = dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights="gaussian")
        dt.inject(model, config, adapter_name=f"t{i}")
        with torch.no_grad():  # a small non-zero update, so each tenant really differs
            for name, param in model.named_parameters():
                if "lora_B" in name and f".t{i}." in name:
                    param.normal_(0, 0.01)
        dt.save_adapter(model, root / f"tenant-{i}", adapter_name=f"t{i}")
        dt.delete_adapter(model, f"t{i}")


def start_server(adapters: Path, max_batch: int, mode: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "deltatune", "serve", "--base", "smollm2", "--base-name", "base",
        "--adapters-dir", str(adapters), "--port", str(port), "--max-batch", str(max_batch),
        "--log-level", "warning", *(["--fixed-batches"] if mode == "fixed" else []),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start")


def run_load(url: str, clients: int, requests: int, adapters: int, max_tokens: list[int]) -> dict:
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    tokens = [0]

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {
                    "model": f"tenant-{i % adapters}",
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": max_tokens[i % len(max_tokens)],
                    "temperature": 0,
                }
                started = time.perf_counter()
                response = http.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        tokens[0] += response.json()["usage"]["completion_tokens"]
                    else:
                        errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": requests,
        "adapters": adapters,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "p50_s": round(statistics.median(ordered), 3) if ordered else None,
        "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3) if ordered else None,
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[16], help="cycled over requests")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=["continuous", "fixed"], default=["continuous"])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(Path(tmp), args.adapters)
        servers = {mode: start_server(Path(tmp), args.max_batch, mode) for mode in args.modes}
        try:
            for _, url in servers.values():
                run_load(url, 1, args.adapters, args.adapters, [2])  # warm-up: every adapter loaded once
            for clients in args.clients:
                for mode, (_, url) in servers.items():  # one after the other, under the same conditions
                    result = run_load(url, clients, args.requests, args.adapters, args.max_tokens)
                    result = {
                        "mode": mode,
                        **result,
                        "server_stats": httpx.get(f"{url}/health/details").json()["stats"],
                    }
                    results.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
