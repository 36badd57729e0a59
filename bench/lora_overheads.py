"""The small costs of LoRA's step besides its products (bench/lora_flops.py times those), and two fusions weighed.

- `python`: Python and autograd around the fused LoRA kernel: 210 adapted 8 x 8 layers (work negligible)
  forward and backward, against the same 210 frozen nn.Linear layers; the difference is per step on the
  SmolLM2 shape (210 adapted layers).
- `qkv-a-side`: q, k and v read the same input, so their A products could be one 48-wide product instead of
  three 16-wide ones (forward h = x A^T, backward dx += gh A and dA = gh^T x); per block of 512 tokens.
- `qkv-base` / `gate-up-base`: the frozen q, k, v (or gate, up) weights concatenated into one product, forward
  and input gradient, against separate products whose input gradients are summed; per block.

Side by side in this process, rounds interleaved, medians in ms.

    python bench/lora_overheads.py --reps 7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved  # noqa: E402

import deltatune as dt  # noqa: E402

TOKENS, HIDDEN, KV, INTERMEDIATE, RANK, ADAPTED_LAYERS = 512, 576, 192, 1536, 16, 210


def _repeat(fn: Callable[[], object], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            fn()

    return run


def python_overhead(calls: int) -> dict[str, Callable[[], None]]:
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(ADAPTED_LAYERS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    frozen = Stack().requires_grad_(False)
    adapted = copy.deepcopy(frozen)
    names = [f"layers.{i}" for i in range(ADAPTED_LAYERS)]
    dt.inject(adapted, dt.LoraConfig(r=4, target_modules=names, init_lora_weights=False))
    adapted.train()

    def step(model: nn.Module) -> Callable[[], None]:
        return lambda: model(torch.randn(4, 8, requires_grad=True)).sum().backward()

    return {
        "frozen 210 layers": _repeat(step(frozen), calls),
        "LoRA 210 layers": _repeat(step(adapted), calls),
    }


def qkv_a_side(calls: int) -> dict[str, Callable[[], None]]:
    x, dx = torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, HIDDEN)
    a = [torch.randn(RANK, HIDDEN) for _ in range(3)]
    gh = [torch.randn(TOKENS, RANK) for _ in range(3)]
    a_cat, gh_cat = torch.cat(a), torch.cat(gh, 1)

    def separate() -> None:
        for a_i, gh_i in zip(a, gh, strict=True):
            x @ a_i.t()
            dx.addmm_(gh_i, a_i)
            gh_i.t() @ x

    def batched() -> None:
        x @ a_cat.t()
        dx.addmm_(gh_cat, a_cat)
        gh_cat.t() @ x

    return {"A side, three 16-wide": _repeat(separate, calls), "A side, one 48-wide": _repeat(batched, calls)}


def fused_base(outs: tuple[int, ...], calls: int) -> dict[str, Callable[[], None]]:
    x = torch.randn(TOKENS, HIDDEN)
    ws = [torch.randn(o, HIDDEN) for o in outs]
    gs = [torch.randn(TOKENS, o) for o in outs]
    w_cat, g_cat = torch.cat(ws), torch.cat(gs, 1)

    def separate() -> None:
        [x @ w.t() for w in ws]
        total = gs[0] @ ws[0]
        for g, w in zip(gs[1:], ws[1:], strict=True):
            total = total + g @ w

    def concatenated() -> None:
        (x @ w_cat.t()).split(outs, 1)
        g_cat @ w_cat

    label = "+".join(map(str, outs))
    return {
        f"base {label}, separate": _repeat(separate, calls),
        f"base {label}, one": _repeat(concatenated, calls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    calls = 20  # per timed call, so each timing is milliseconds long
    cases = {
        "python": python_overhead(calls),
        "qkv-a-side": qkv_a_side(calls),
        "qkv-base": fused_base((HIDDEN, KV, KV), calls),
        "gate-up-base": fused_base((INTERMEDIATE, INTERMEDIATE), calls),
    }
    print(f"## LoRA's small costs, {torch.get_num_threads()} threads, median of {args.reps}, ms per call")
    print("| case | variant | ms | difference ms |")
    print("|---|---|---|---|")
    for case, fns in cases.items():
        times = interleaved(fns, args.reps, progress=False)
        (first, base), (second, other) = [(k, statistics.median(v) * 1e3 / calls) for k, v in times.items()]
        print(f"| {case} | {first} | {base:.3f} | |")
        print(f"| {case} | {second} | {other:.3f} | {other - base:+.3f} |")


if __name__ == "__main__":
    main()
