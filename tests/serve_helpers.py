"""`deltatune serve` as a real process on 127.0.0.1, for tests that drive it over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    base: Path, adapters_dir: Path, *options: str, python: Path | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start the server (API key KEY), wait until /health answers, yield (process, url); stop it after.
    `server_log(process)` is what it wrote to stderr. `python`: another interpreter to run it (default: this one)."""
    port = free_port()
    command = [
        str(python or sys.executable), "-m", "deltatune", "serve", "--base", str(base), "--base-name", "base",
        "--adapters-dir", str(adapters_dir), "--port", str(port), "--api-key-env", "DT_TEST_KEY",
        "--log-level", "warning", *options,
    ]  # fmt: skip
    # stderr goes to a file: a pipe nobody reads fills up (64 KiB of log lines) and then blocks the server
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env={**os.environ, "DT_TEST_KEY": KEY}, stderr=log, text=True)
        process.log = log
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(process, url)
        try:
            yield process, url
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    raise


def _wait_until_up(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 600  # a hang guard: a loaded machine starts a server slowly
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start: {server_log(process)[-3000:]}")
        time.sleep(0.2)


def server_log(process: subprocess.Popen) -> str:
    """What the server wrote to stderr so far."""
    process.log.flush()
    process.log.seek(0)
    return process.log.read()


def saved_lora_adapters(
    base: Path,
    root: Path,
    adapters: dict[str, tuple[int, list[str] | str]],
    *,
    b_std: float | None = None,
    init_lora_weights: bool = True,
) -> Path:
    """The adapters a server test serves: LoRA r (lora_alpha 4r) on the given targets of the tiny causal LM,
    each seeded by its position and saved as root/NAME. `b_std`: draw lora_B from N(0, b_std), so that an
    adapter changes the output; `init_lora_weights=False`: random A and B (PEFT's test init)."""
    import torch
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for seed, (name, (r, targets)) in enumerate(adapters.items()):
        torch.manual_seed(seed)
        key = name.replace("-", "_")
        config = dt.LoraConfig(
            r=r, lora_alpha=4 * r, target_modules=targets, init_lora_weights=init_lora_weights
        )
        dt.inject(model, config, key)
        if b_std is not None:
            for _, layer in dt.core.adapters.adapter_layers(model):
                if key in layer.adapter_configs:
                    torch.nn.init.normal_(layer.lora_B[key].weight, std=b_std)
        dt.save_adapter(model, root / name, adapter_name=key)
    return root
