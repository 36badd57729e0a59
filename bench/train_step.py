"""Training-step, peak-memory and inference benchmarks: deltatune LoRA vs HF PEFT LoRA vs the frozen floor vs
full fine-tuning, on the SmolLM2-135M shape (random init), batch 4 x 128. Ratios of medians, side by side.

    python bench/train_step.py train --dtype fp32 --reps 7
    python bench/train_step.py train --dtype bf16 --reps 7
    python bench/train_step.py memory --repeats 3
    python bench/train_step.py inference --reps 9

Each deltatune variant takes its loss as deltatune's trainer does (`task_loss`: the output head fused with the
cross-entropy, task/head_loss.py); the floor and PEFT take transformers' `model(**inputs).loss`, as PEFT
with the transformers Trainer does. `floor-dt` is the floor with deltatune's loss, `dt-hf-loss:<s>` deltatune
LoRA with transformers' loss: side by side they split a ratio into the loss path and LoRA's own cost.

`--device cuda` runs any of them on a GPU (bench/gpu.sh): steps are timed to the end of the GPU's work, and
memory is `torch.cuda.max_memory_allocated` instead of the resident set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import base_model, batch, interleaved, make_variant, median, uses_deltatune_loss  # noqa: E402

from deltatune.task.loss import task_loss  # noqa: E402

TRAIN_VARIANTS = ["floor", "floor-dt", "full", "dt:qv-r8", "peft:qv-r8", "dt:all-r16", "peft:all-r16"]


def train_step_fn(
    model: torch.nn.Module, inputs: dict, dtype: str, optimizer_out: list | None = None, dt_loss: bool = False
):
    params = [p for p in model.parameters() if p.requires_grad]
    # The floor trains nothing, but every training process holds an optimizer, and creating one imports
    # torch.optim's machinery (torch._dynamo among it): ~73 MiB resident. The floor pays that too, over a
    # placeholder parameter that never gets a gradient. Fused, as deltatune's trainer uses it (and transformers'
    # Trainer by default), for every variant.
    placeholder = [torch.nn.Parameter(torch.zeros(1, device=inputs["input_ids"].device))]
    optimizer = torch.optim.AdamW(params or placeholder, lr=1e-5, fused=True)
    if optimizer_out is not None:
        optimizer_out.append(optimizer)
    model.train()
    device = inputs["input_ids"].device

    trainer_batch = inputs | {"attention_mask": torch.ones_like(inputs["input_ids"])}

    def loss_of() -> torch.Tensor:
        if not dt_loss:
            return model(**inputs).loss
        total, count, _ = task_loss(model, trainer_batch, False)  # as deltatune's trainer takes it
        return total / count

    def step() -> None:
        bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
        with bf16 if dtype == "bf16" else contextlib.nullcontext():
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    return step


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a timer around a step measures the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on(device: str, inputs: dict) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def run_train(args) -> None:
    base = base_model().to(args.device)
    inputs = on(args.device, batch())
    fns = {
        name: train_step_fn(make_variant(name, base), inputs, args.dtype, dt_loss=uses_deltatune_loss(name))
        for name in args.variants
    }
    times = interleaved(fns, args.reps)
    floor = median(times["floor"])
    print(
        f"## training step, {args.dtype}, batch 4x128, {args.reps} interleaved reps, torch threads "
        f"{torch.get_num_threads()}, {args.device}"
    )
    print("| variant | median s | x floor |")
    print("|---|---|---|")
    for name in args.variants:
        print(f"| {name} | {median(times[name]):.3f} | {median(times[name]) / floor:.3f} |")
    for setting in ("qv-r8", "all-r16"):
        if f"dt:{setting}" in times and f"peft:{setting}" in times:
            ratio = median(times[f"dt:{setting}"]) / median(times[f"peft:{setting}"])
            print(f"\ndeltatune / PEFT, {setting}: {ratio:.3f}")


def peak_mib(device: str) -> float:
    """The peak so far: the resident set on the CPU, allocated memory on a GPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_mib(model: torch.nn.Module, optimizer) -> float:
    """Bytes held between steps: parameters, buffers and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def cpu_step_allocated_mib(step) -> float:
    """The most tensor memory live at once during one step, above what was live at its start, from the
    profiler's allocation events: the CPU counterpart of max_memory_allocated, blind to how glibc's heap
    fragments (which moves the resident set by +-40 MiB between identical runs of one variant)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def run_memory_one(args) -> None:
    base = base_model().to(args.device)
    model = make_variant(args.variant, base)
    del base
    optimizer: list = []
    step = train_step_fn(
        model, on(args.device, batch()), args.dtype, optimizer, dt_loss=uses_deltatune_loss(args.variant)
    )
    before = peak_mib(args.device)
    for _ in range(3):
        step()
    row = {"variant": args.variant, "peak_rss_mib": peak_mib(args.device), "before_steps_mib": before}
    if args.device == "cpu":  # after the resident peak is read: the profiler's own records add to it
        row["allocated_mib"] = tensor_mib(model, optimizer[0]) + cpu_step_allocated_mib(step)
    print(json.dumps(row))


def run_memory(args) -> None:
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):  # variants interleaved, so a drift of the machine hits all of them alike
        for variant in args.variants:
            out = subprocess.run(
                [sys.executable, __file__, "memory-one", "--variant", variant, "--dtype", args.dtype,
                 "--device", args.device],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def med(variant: str, key: str) -> float:
        return median([r[key] for r in runs[variant]])

    what = "peak allocated GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(
        f"## {what} over 3 training steps, {args.dtype}, batch 4x128, median of {args.repeats} fresh "
        f"processes per variant, {args.device}"
    )
    cpu = args.device == "cpu"
    print(
        "| variant | peak RSS MiB (runs) | x floor | RSS after build MiB | step peak - build MiB |"
        + (" peak allocated MiB | x floor |" if cpu else "")
    )
    print("|---|---|---|---|---|" + ("---|---|" if cpu else ""))
    for variant in args.variants:
        peak, build = med(variant, "peak_rss_mib"), med(variant, "before_steps_mib")
        each = "/".join(f"{r['peak_rss_mib']:.0f}" for r in runs[variant])
        line = (
            f"| {variant} | {peak:.0f} ({each}) | {peak / med('floor', 'peak_rss_mib'):.3f} | {build:.0f} | "
            f"{peak - build:.0f} |"
        )
        if cpu:
            allocated = med(variant, "allocated_mib")
            line += f" {allocated:.0f} | {allocated / med('floor', 'allocated_mib'):.3f} |"
        print(line)


def run_inference(args) -> None:
    base = base_model().to(args.device)
    inputs = {"input_ids": batch()["input_ids"].to(args.device)}
    variants = ["base", "dt:all-r16", "dt-merged:all-r16", "peft:all-r16", "peft-merged:all-r16"]
    models = {}
    for name in variants:
        if name == "base":
            models[name] = base
        elif name.startswith("peft-merged"):
            models[name] = make_variant("peft:all-r16", base).merge_and_unload()
        else:
            models[name] = make_variant(name, base)
    fns = {}
    for name, model in models.items():
        model.eval()
        fns[name] = (lambda m: lambda: (m(**inputs), synchronize(inputs["input_ids"].device)))(model)
    with torch.inference_mode():
        times = interleaved(fns, args.reps)
    reference = median(times["base"])
    print(f"## inference forward, fp32, batch 4x128, {args.reps} interleaved reps, {args.device}")
    print("| variant | median s | x base |")
    print("|---|---|---|")
    for name in variants:
        print(f"| {name} | {median(times[name]):.3f} | {median(times[name]) / reference:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what", choices=["train", "memory", "memory-one", "inference"], nargs="?", default="train"
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=TRAIN_VARIANTS)
    parser.add_argument("--variant")
    parser.add_argument("--repeats", type=int, default=3, help="memory: fresh processes per variant")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    args = parser.parse_args()
    {"train": run_train, "memory": run_memory, "memory-one": run_memory_one, "inference": run_inference}[
        args.what
    ](args)


if __name__ == "__main__":
    main()
