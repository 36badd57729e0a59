"""QLoRA memory and speed: LoRA (all-linear, r=16) on a float32 vs NF4 vs int8 frozen base, full fine-tuning,
and the same through HF PEFT + transformers' bitsandbytes loading.

Every configuration starts the way a user would, from a float32 safetensors checkpoint on disk (random init,
written once to the bench cache): deltatune's quantized bases come from `load_quantized` (tensor by tensor),
the float ones and PEFT's from `from_pretrained`. Two shapes:
- smollm2: SmolLM2-135M, batch 4 x 128;
- 1b: a ~1.1B llama (hidden 2048, 22 layers, intermediate 5632, 32 heads / 4 KV heads, vocabulary 32000,
  untied head), batch 1 x 256 with gradient checkpointing (non-reentrant).

Memory: each configuration in a fresh process; peak RSS (VmHWM) after loading and after 3 training steps,
split into anonymous memory and mapped file pages at the end. Speed: the LoRA configurations side by side in
one process, interleaved, median seconds per step. fp32 compute throughout.

    python bench/qlora_memory.py memory --shape 1b
    python bench/qlora_memory.py speed --shape 1b --reps 3

`memory --lean-heap` sets glibc's mmap threshold to 2 MiB in every process first, as `deltatune train` does for a
quantized base (deltatune.core.allocator.return_large_blocks_to_os).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from common import LORA_SETTINGS, interleaved, median, smollm2_shape, tinyllama_shape
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import deltatune as dt
from deltatune.core.allocator import return_large_blocks_to_os
from deltatune.quant import load_quantized
from deltatune.train.setup import enable_gradient_checkpointing

DT_CONFIGS = ["lora-fp32", "lora-nf4", "lora-int8"]
PEFT_CONFIGS = ["peft-lora-fp32", "peft-lora-nf4"]
CONFIGS = [*DT_CONFIGS, "full", *PEFT_CONFIGS]


SHAPES = {
    "smollm2": dict(config=smollm2_shape, batch=(4, 128), checkpointing=False),
    "1b": dict(config=tinyllama_shape, batch=(1, 256), checkpointing=True),
}


def checkpoint(shape: str) -> Path:
    """A float32 random-init checkpoint of `shape`, written once (atomically) to the bench cache."""
    root = Path(os.environ.get("DELTATUNE_BENCH_CACHE", Path.home() / ".cache" / "deltatune" / "bench"))
    folder = root / f"{shape}-fp32"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(SHAPES[shape]["config"]())
        staging = folder.with_name(folder.name + ".partial")
        model.save_pretrained(staging)
        staging.rename(folder)
    return folder


def inputs(shape: str) -> dict[str, torch.Tensor]:
    rows, length = SHAPES[shape]["batch"]
    ids = torch.randint(
        0, SHAPES[shape]["config"]().vocab_size, (rows, length), generator=torch.Generator().manual_seed(1)
    )
    return {"input_ids": ids, "labels": ids.clone()}


def build(config: str, shape: str) -> torch.nn.Module:
    path = checkpoint(shape)
    lora = LORA_SETTINGS["all-r16"]
    if config.startswith("peft-"):
        return _build_peft(config, path, lora, SHAPES[shape]["checkpointing"])
    if config in ("lora-nf4", "lora-int8"):
        model = load_quantized(path, 4 if config == "lora-nf4" else 8)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if config == "full":
        model.requires_grad_(True)
    else:
        dt.inject(model, dt.LoraConfig(**lora))
    if SHAPES[shape]["checkpointing"]:
        enable_gradient_checkpointing(model)
    return model


def _build_peft(config: str, path: Path, lora: dict, checkpointing: bool) -> torch.nn.Module:
    """PEFT's documented QLoRA recipe: transformers loads and quantizes, prepare_model_for_kbit_training, LoRA."""
    import peft
    from transformers import BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32}
    if config == "peft-lora-nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config == "peft-lora-nf4":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )  # fmt: skip
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft.get_peft_model(model, peft.LoraConfig(**lora))


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def step_fn(model: torch.nn.Module, batch: dict):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)  # foreach keeps a temporary per-group copy
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _memory_now() -> dict[str, float]:
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def run_one(config: str, shape: str, steps: int, lean_heap: bool) -> None:
    if lean_heap:
        return_large_blocks_to_os()
    model = build(config, shape)
    loaded = _memory_now()["VmHWM"]
    step = step_fn(model, inputs(shape))
    for _ in range(steps):
        step()
    now = _memory_now()
    print(json.dumps({
        "config": config, "weights_mib": weight_bytes(model) / 2**20, "load_peak_mib": loaded,
        "peak_mib": now["VmHWM"], "anon_mib": now["RssAnon"], "file_mib": now["RssFile"],
    }))  # fmt: skip


def run_memory(args) -> None:
    checkpoint(args.shape)
    rows = []
    for config in args.configs:
        out = subprocess.run(
            [sys.executable, __file__, "one", config, "--shape", args.shape, "--steps", str(args.steps)]
            + (["--lean-heap"] if args.lean_heap else []),
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            print(f"{config} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows_, length = SHAPES[args.shape]["batch"]
    by_name = {r["config"]: r for r in rows}
    reference = by_name.get("lora-fp32", rows[0])["peak_mib"]
    peft_reference = by_name.get("peft-lora-fp32", {}).get("peak_mib")
    print(
        f"## peak RSS, fresh process per configuration, {args.shape} shape, batch {rows_}x{length}, "
        f"{args.steps} training steps{', gradient checkpointing' if SHAPES[args.shape]['checkpointing'] else ''}"
        f"{', lean heap' if args.lean_heap else ''}"
    )
    print("| configuration | weights as stored MiB | peak after load MiB | peak MiB | at end: anon / file MiB "
          "| x lora-fp32 | x peft-lora-fp32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        versus_peft = f"{r['peak_mib'] / peft_reference:.3f}" if peft_reference else "-"
        print(
            f"| {r['config']} | {r['weights_mib']:.0f} | {r['load_peak_mib']:.0f} | {r['peak_mib']:.0f} "
            f"| {r['anon_mib']:.0f} / {r['file_mib']:.0f} | {r['peak_mib'] / reference:.3f} | {versus_peft} |"
        )


def run_speed(args) -> None:
    batch = inputs(args.shape)
    fns = {config: step_fn(build(config, args.shape), batch) for config in args.configs}
    times = interleaved(fns, args.reps)
    reference = median(times[args.configs[0]])
    rows_, length = SHAPES[args.shape]["batch"]
    print(
        f"## training step, {args.shape} shape, fp32 compute, batch {rows_}x{length}, {args.reps} interleaved reps"
    )
    print(f"| configuration | median s | x {args.configs[0]} |")
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
    speed.add_argument("--configs", nargs="+", default=DT_CONFIGS, choices=CONFIGS)
    speed.add_argument("--reps", type=int, default=5)
    one = sub.add_parser("one")
    one.add_argument("config", choices=CONFIGS)
    for p in (memory, speed, one):
        p.add_argument("--shape", choices=SHAPES, default="smollm2")
    for p in (memory, one):
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--lean-heap", action="store_true", help="glibc mmap threshold 2 MiB in every process")
    args = parser.parse_args()
    if args.command == "one":
        run_one(args.config, args.shape, args.steps, args.lean_heap)
    elif args.command == "memory":
        run_memory(args)
    else:
        run_speed(args)


if __name__ == "__main__":
    main()
