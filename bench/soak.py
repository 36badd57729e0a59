"""Soak `deltatune serve`: many clients at once, mixed adapters, streamed and plain requests, clients that give up
mid-answer, and adapters loaded and unloaded during the traffic. Checks that no request gets a 5xx, that every
greedy answer equals the same request made alone (no adapter cross-talk), and that the server's memory does
not grow between two equal rounds.

    python bench/soak.py                       # tiny model, 3 adapters, 32 clients, 2 x 600 requests
    python bench/soak.py --base smollm2 --requests 300 --max-tokens 16

`tests/test_serve_soak.py` runs a smaller round of the same driver in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["good day", "the phone was", "awful movie", "my food is", "so very happy today", "it was"]


@dataclass
class Round:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)  # greedy answers that differ from the request alone
    latencies_s: list[float] = field(default_factory=list)  # of answered, non-abandoned requests
    abandoned: int = 0  # clients that gave up on purpose (stream closed early, or read timeout)
    adapter_calls: Counter = field(default_factory=Counter)  # "load 200", "unload 404", ...
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        """5xx answers to completions and to adapter calls."""
        calls = sum(n for call, n in self.adapter_calls.items() if int(call.split()[1]) >= 500)
        return calls + sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict:
        ordered = sorted(self.latencies_s)

        def quantile(q: float) -> float:
            return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 4) if ordered else 0.0

        data = asdict(self)
        data.update(
            statuses=dict(self.statuses),
            adapter_calls=dict(self.adapter_calls),
            server_errors=self.server_errors,
            mismatches=self.mismatches[:5],
            mismatch_count=len(self.mismatches),
            p50_s=quantile(0.5),
            p99_s=quantile(0.99),
            mean_s=round(statistics.fmean(ordered), 4) if ordered else 0.0,
        )
        del data["latencies_s"]
        return data


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def references(url: str, headers: dict, models: list[str], max_tokens: int) -> dict[tuple[str, str], str]:
    """Each (model, prompt)'s greedy answer, asked alone, one request at a time."""
    answers = {}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        for model in models:
            for prompt in PROMPTS:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                response = http.post("/v1/completions", json=body)
                response.raise_for_status()
                answers[(model, prompt)] = response.json()["choices"][0]["text"]
    return answers


def run_round(
    url: str,
    headers: dict,
    pid: int,
    models: list[str],
    adapters: list[str],
    expected: dict[tuple[str, str], str],
    *,
    clients: int,
    requests: int,
    max_tokens: int,
) -> Round:
    """`requests` requests from `clients` threads. Request i: model and prompt rotate; every 3rd is streamed;
    every 10th client gives up early (closes its stream after the first event, or times out a plain request);
    every 25th is preceded by an adapter load or unload."""
    result = Round(rss_before_mib=rss_mib(pid))
    counter = iter(range(requests))
    lock = threading.Lock()

    def record(status: int, text: str | None, key: tuple[str, str], elapsed: float) -> None:
        with lock:
            result.requests += 1
            result.statuses[status] += 1
            if status == 200 and text is not None:
                result.latencies_s.append(elapsed)
                if text != expected[key]:
                    result.mismatches.append(f"{key}: {text!r} != {expected[key]!r}")

    def adapter_call(http: httpx.Client, i: int) -> None:
        name = adapters[(i // 25) % len(adapters)]
        if (i // 25) % 2:
            response, what = http.delete(f"/v1/adapters/{name}"), "unload"
        else:
            response, what = http.post("/v1/adapters", json={"name": name}), "load"
        with lock:
            result.adapter_calls[f"{what} {response.status_code}"] += 1

    def one(http: httpx.Client, i: int) -> None:
        model = models[i % len(models)]
        prompt = PROMPTS[(i // len(models)) % len(PROMPTS)]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if i % 25 == 0:
            adapter_call(http, i)
        started = time.perf_counter()
        gives_up = i % 10 == 7
        if i % 3 == 1:
            with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                if response.status_code != 200:
                    record(response.status_code, None, (model, prompt), 0)
                    return
                text, events = "", 0
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        record(500, None, (model, prompt), 0)
                        return
                    text += event["choices"][0]["text"]
                    events += 1
                    if gives_up:
                        break  # the client goes away mid-stream
            if gives_up:
                with lock:
                    result.abandoned += 1
                return
            record(200, text, (model, prompt), time.perf_counter() - started)
            return
        if gives_up:
            try:
                http.post("/v1/completions", json=body, timeout=0.01)
            except httpx.TimeoutException:
                with lock:
                    result.abandoned += 1
                return
        response = http.post("/v1/completions", json=body)
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else None
        record(response.status_code, text, (model, prompt), time.perf_counter() - started)

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                one(http, i)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = round(time.perf_counter() - started, 2)
    time.sleep(0.5)  # let abandoned rows end
    result.rss_after_mib = rss_mib(pid)
    return result


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_helpers import AUTH, running_server

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", default="tiny", help="'tiny' (random llama built here) or a model name/folder"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make_base_and_adapters(Path(tmp), args.base)
        with running_server(base, Path(tmp) / "adapters", "--max-tokens", str(args.max_tokens)) as (
            process,
            url,
        ):
            models = ["base", *adapters]
            expected = references(url, AUTH, models, args.max_tokens)
            for number in range(args.rounds):
                outcome = run_round(
                    url, AUTH, process.pid, models, adapters, expected,
                    clients=args.clients, requests=args.requests, max_tokens=args.max_tokens,
                )  # fmt: skip
                print(json.dumps({"round": number + 1, **outcome.summary()}), flush=True)


def make_base_and_adapters(folder: Path, base: str) -> tuple[Path | str, list[str]]:
    """The base model (a folder or a bundled name) and three LoRA adapters of different ranks and targets."""
    import torch
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.models.loading import resolve_model_path

    if base == "tiny":
        from train_helpers import make_tiny_causal_lm

        base = make_tiny_causal_lm(folder / "base")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(str(base)), dtype=torch.float32).eval()
    names = []
    for seed, (r, targets) in enumerate([(2, ["q_proj", "v_proj"]), (4, "all-linear"), (8, ["o_proj"])]):
        torch.manual_seed(seed)
        name = f"tenant-{seed}"
        config = dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        dt.inject(model, config, name.replace("-", "_"))
        dt.save_adapter(model, folder / "adapters" / name, adapter_name=name.replace("-", "_"))
        names.append(name)
    return base, names


if __name__ == "__main__":
    main()
