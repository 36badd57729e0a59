"""Per-rank memory and step time of FSDP against DDP: the ~1.1B llama shape (TinyLlama's), LoRA all-linear r=16,
2 ranks under torchrun (gloo on CPU, nccl on CUDA), gradient checkpointing, batch 1 x 128 per rank.

Each mode runs in its own torchrun launch with the trainer's own pieces (`deltatune.train.fsdp.shard_model`,
`deltatune.train.distributed.wrap_model`, AdamW over the trainable parameters). Memory is each rank's peak while
training: on CPU the resident set's high-water mark (VmHWM), reset after set-up; on CUDA
`torch.cuda.max_memory_allocated`, reset the same way. Set-up itself (every rank builds the whole model before
sharding it) is reported apart, as the peak before the reset. Step time: the median of the steps after the first.

    python bench/fsdp_memory.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import status_mib, tinyllama_shape
from transformers import LlamaForCausalLM

import deltatune as dt
from deltatune.core.allocator import release_freed_memory, return_large_blocks_to_os
from deltatune.task.config import FsdpSpec
from deltatune.train.distributed import init_distributed, pick_device, shutdown, wrap_model
from deltatune.train.fsdp import shard_model
from deltatune.train.setup import enable_gradient_checkpointing

MODES = ["ddp", "fsdp"]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mib("VmHWM")


def worker(mode: str, steps: int, length: int) -> None:
    return_large_blocks_to_os()  # freed weights go back to the OS, so the resident set shows what is held
    info = init_distributed()
    device = pick_device("auto", info)
    process_base = status_mib("VmRSS") if device.type == "cpu" else 0.0  # torch, transformers, gloo: no model
    torch.manual_seed(0)
    model = LlamaForCausalLM(tinyllama_shape())
    dt.inject(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    enable_gradient_checkpointing(model)
    if mode == "fsdp":
        model = shard_model(model, FsdpSpec(), device, "fp32").to(device)
        wrapped = model
    else:
        model = model.to(device)
        wrapped = wrap_model(model, info, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    setup_peak = peak_mib(device)
    reset_peak(device)
    ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(info.rank)).to(device)
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        release_freed_memory()  # as the trainer does under FSDP on CPU; here for DDP too, to compare like with like
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tick)
    record = {"rank": info.rank, "process_base_mib": process_base, "setup_peak_mib": setup_peak, "train_peak_mib": peak_mib(device),
              "step_s": statistics.median(times[1:] or times), "device": str(device)}  # fmt: skip
    records = [None] * info.world_size
    dist.all_gather_object(records, record)
    if info.is_main:
        print("RESULT " + json.dumps({"mode": mode, "ranks": records}), flush=True)
    shutdown(info)


def launch(mode: str, steps: int, length: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--worker", mode, "--steps", str(steps), "--length", str(length)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def table(results: dict) -> str:
    lines = [
        "| mode | rank | process without a model MiB | set-up peak MiB | training peak MiB | training peak above "
        "the process MiB | step s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, result in results.items():
        for r in result["ranks"]:
            above = r["train_peak_mib"] - r["process_base_mib"]
            lines.append(
                f"| {mode} | {r['rank']} | {r['process_base_mib']:.0f} | {r['setup_peak_mib']:.0f} | "
                f"{r['train_peak_mib']:.0f} | {above:.0f} | {r['step_s']:.1f} |"
            )
    worst = {m: max(r["train_peak_mib"] for r in results[m]["ranks"]) for m in results}
    above = {
        m: max(r["train_peak_mib"] - r["process_base_mib"] for r in results[m]["ranks"]) for m in results
    }
    step = {m: statistics.mean(r["step_s"] for r in results[m]["ranks"]) for m in results}
    lines.append("")
    for m in (m for m in results if m != "ddp"):
        lines.append(
            f"{m} / ddp: per-rank training peak {worst[m] / worst['ddp']:.2f}x, above the process without a "
            f"model {above[m] / above['ddp']:.2f}x (goal <= 0.65x); step time {step[m] / step['ddp']:.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.length)
    results = {mode: launch(mode, args.steps, args.length) for mode in MODES}
    print(table(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
