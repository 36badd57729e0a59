"""How close can LoRA's training step get to the frozen floor? The arithmetic, and what this CPU makes of it.

On the SmolLM2-135M shape with 4 x 128 tokens (bench/train_step.py's batch), it counts the floating-point work
per token of the floor (forward and input-gradient backward of every frozen linear layer, the head and
attention) and what LoRA adds on every adapted layer: h = x A^T, y += s h B^T, g B, dx += (s g B) A,
dA = (s g B)^T x, dB = s g^T h, that is 6 r (in + out) per token. Then it times, side by side in this process,
the base layers' two products (x W^T and g W) against LoRA's six for the same 210 layers, so the ratio shows
how efficiently the thin rank-r products run next to the square ones.

    python bench/lora_flops.py --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB, SEQUENCE, TOKENS = 576, 1536, 192, 30, 49152, 128, 512
# (in, out) of q, k, v, o, gate, up, down in one SmolLM2-135M block
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
          (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]  # fmt: skip


def flops_per_token(rank: int) -> dict[str, float]:
    linear = LAYERS * sum(2 * 2 * i * o for i, o in SHAPES)  # forward and input gradient, 2 FLOPs per MAC
    head = 2 * 2 * HIDDEN * VOCAB
    attention = LAYERS * 3 * 2 * 2 * SEQUENCE * HIDDEN  # QK^T and AV, forward + two backward products
    lora = LAYERS * sum(6 * rank * (i + o) for i, o in SHAPES)
    return {"linear": linear, "head": head, "attention": attention, "lora": lora}


def layer_tensors(rank: int) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "x": torch.randn(TOKENS, i),
            "g": torch.randn(TOKENS, o),
            "w": torch.randn(o, i) * 0.02,
            "a": torch.randn(rank, i) * 0.02,
            "b": torch.randn(o, rank) * 0.02,
            "y": torch.zeros(TOKENS, o),
            "dx": torch.zeros(TOKENS, i),
        }  # fmt: skip
        for _ in range(LAYERS)
        for i, o in SHAPES
    ]


def base_products(layers) -> None:
    for t in layers:
        torch.mm(t["x"], t["w"].t())
        torch.mm(t["g"], t["w"])


def lora_products(layers) -> None:
    """The adapter's share of a fused step: the base output y and input gradient dx exist already (the
    kernel accumulates into them), so only the six products are timed."""
    for t in layers:
        h = t["x"] @ t["a"].t()
        t["y"].addmm_(h, t["b"].t())
        gh = t["g"] @ t["b"]
        t["dx"].addmm_(gh, t["a"])
        gh.t() @ t["x"]
        t["g"].t() @ h


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    f = flops_per_token(args.rank)
    floor = f["linear"] + f["head"] + f["attention"]
    print(
        f"## floating-point work per token, SmolLM2-135M shape, LoRA r={args.rank} on all 7 linear layers x {LAYERS}"
    )
    print(f"floor {floor / 1e6:.1f} MFLOP (linear {f['linear'] / 1e6:.1f}, head {f['head'] / 1e6:.1f}, "
          f"attention {f['attention'] / 1e6:.1f}); LoRA adds {f['lora'] / 1e6:.1f} MFLOP = "
          f"{f['lora'] / floor:.1%} of the floor, {f['lora'] / f['linear']:.1%} of the linear layers' work")  # fmt: skip
    layers = layer_tensors(args.rank)
    base_products(layers), lora_products(layers)  # warm up
    times: dict[str, list[float]] = {"base": [], "lora": []}
    for rep in range(args.reps):
        for name in ("base", "lora") if rep % 2 == 0 else ("lora", "base"):
            tick = time.perf_counter()
            (base_products if name == "base" else lora_products)(layers)
            times[name].append(time.perf_counter() - tick)
    base, lora = statistics.median(times["base"]), statistics.median(times["lora"])
    work = f["lora"] / f["linear"]
    print(
        f"\n{len(layers)} layers, {TOKENS} tokens, {torch.get_num_threads()} threads, median of {args.reps}:"
    )
    print(f"base x W^T and g W: {base:.3f} s; LoRA's six products: {lora:.3f} s = {lora / base:.1%} of the base "
          f"time for {work:.1%} of its work: the rank-{args.rank} products run at {work / (lora / base):.0%} of the "
          "base products' rate")  # fmt: skip


if __name__ == "__main__":
    main()
