"""QLoRA memory and speed: LoRA (all-linear, r=16) on a float32 vs NF4 vs int8 frozen base, and full fine-tuning.

Memory: each configuration in a fresh process (peak RSS over 3 training steps, and the bytes of the model's
weights as stored). Speed: the three LoRA configurations side by side in one process, interleaved, median.
SmolLM2-135M shape, random init, batch 4 x 128, fp32 compute.

    python bench/qlora_memory.py memory
    python bench/qlora_memory.py speed --reps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from common import LORA_SETTINGS, base_model, batch, interleaved, median

import deltatune as dt
from deltatune.quant import quantize_base

CONFIGS = ["lora-fp32", "lora-nf4", "lora-int8", "full"]


def build(config: str) -> torch.nn.Module:
    model = base_model()
    if config == "full":
        model.requires_grad_(True)
        return model
    bits = {"lora-nf4": 4, "lora-int8": 8}.get(config)
    if bits:
        quantize_base(model, bits)
    dt.inject(model, dt.LoraConfig(**LORA_SETTINGS["all-r16"]))
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def step_fn(model: torch.nn.Module, inputs: dict):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_one(config: str) -> None:
    model = build(config)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = step_fn(model, batch())
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": config, "weights_mib": weight_bytes(model) / 2**20, "build_mib": built,
                      "peak_mib": peak}))  # fmt: skip


def run_memory(args) -> None:
    rows = []
    for config in args.configs:
        out = subprocess.run(
            [sys.executable, __file__, "one", config], check=True, capture_output=True, text=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    reference = next((r for r in rows if r["config"] == "lora-fp32"), rows[0])["peak_mib"]
    print("## peak RSS over 3 training steps, fresh process per configuration, SmolLM2 shape, batch 4x128")
    print("| configuration | weights as stored MiB | peak RSS after build MiB | peak RSS MiB | x lora-fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['weights_mib']:.0f} | {r['build_mib']:.0f} | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] / reference:.3f} |"
        )


def run_speed(args) -> None:
    inputs = batch()
    fns = {config: step_fn(build(config), inputs) for config in ("lora-fp32", "lora-nf4", "lora-int8")}
    times = interleaved(fns, args.reps)
    reference = median(times["lora-fp32"])
    print(f"## training step, fp32 compute, batch 4x128, {args.reps} interleaved reps in one process")
    print("| configuration | median s | x lora-fp32 |")
    print("|---|---|---|")
    for config, values in times.items():
        print(f"| {config} | {median(values):.3f} | {median(values) / reference:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    memory = sub.add_parser("memory")
    memory.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    speed = sub.add_parser("speed")
    speed.add_argument("--reps", type=int, default=5)
    one = sub.add_parser("one")
    one.add_argument("config", choices=CONFIGS)
    args = parser.parse_args()
    if args.command == "one":
        run_one(args.config)
    elif args.command == "memory":
        run_memory(args)
    else:
        run_speed(args)


if __name__ == "__main__":
    main()
