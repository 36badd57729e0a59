"""Sixteen streams on a bf16 base: what float32 decode attention and kept adapter casts are worth.

The bundled SmolLM2-135M-Instruct in bf16 (as `--dtype bfloat16` loads it), the quickstart's float32 adapter
on it, 16 copies of one chat prompt decoded together by the engine (`DecodeBatch`), greedy, `--tokens` each.
Two workloads: every row on the one adapter, and rows alternating between two adapters (a mixed batch: the
same file loaded under two names). Each variant switches the levers in this process, so all run side by side,
interleaved, medians of `--reps` rounds:
  before        bf16 KV cache and torch's bf16 attention; adapter factors cast at every call; mixed stacks in
                the adapter's float32
  attention     only the decode steps' float32 attention over a float32 cache (runtime.decode_attention)
  casts         only the kept casts and the base-dtype stacks
  built         both (what the engine does)
Prints tokens/s over all rows and how many rows' tokens equal `before`'s.

    python bench/bf16_streams.py --reps 3 [--tokens 64] [--variants before,built]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
from common import bf16_with_adapter

import deltatune as dt
from deltatune.methods.lora.layers import LoraLinear
from deltatune.runtime import decode, mixed
from deltatune.runtime.decode import DecodeBatch

VARIANTS = ("before", "attention", "casts", "built")


def _cast_per_call(layer: LoraLinear, name: str, dtype: torch.dtype):
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return a.to(dtype), b.to(dtype)


def levers(variant: str) -> ExitStack:
    """The engine with the levers `variant` leaves out switched back to what it did before."""
    stack = ExitStack()
    if variant in ("before", "casts"):
        stack.enter_context(mock.patch.object(decode, "decode_kv_dtype", lambda model: None))
    if variant in ("before", "attention"):
        stack.enter_context(mock.patch.object(LoraLinear, "_inference_factors", _cast_per_call))
        stack.enter_context(mock.patch.object(mixed, "_stack_dtype", lambda layer, factor: factor.dtype))
    return stack


def decode_rows(model, prompt: list[int], adapters: list[str], tokens: int) -> tuple[float, list[list[int]]]:
    """(new tokens per second over all rows, each row's tokens)."""
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, capacity=len(adapters))
    steps = batch.add([prompt] * len(adapters), adapters, max_new_tokens=[tokens] * len(adapters))
    handles = [s.row for s in steps]
    started = time.perf_counter()
    count = 0
    while len(batch):
        batch.step()
        count += 1
    rate = count * len(adapters) / (time.perf_counter() - started)
    return rate, [batch.completion(h).tokens for h in handles]


def main() -> None:
    from transformers import AutoTokenizer

    from deltatune.models.bundled import smollm2_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=Path("outputs/quickstart/adapter"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    model = bf16_with_adapter(args.adapter)
    dt.load_adapter(model, args.adapter, adapter_name="other")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    messages = [{"role": "user", "content": "Tell me about this tweet: my flight got cancelled again"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    workloads = {"one adapter": ["tuned"] * args.rows, "two adapters": ["tuned", "other"] * (args.rows // 2)}
    rates = {(w, v): [] for w in workloads for v in variants}
    tokens = {}
    for round_ in range(args.reps):
        for workload, adapters in workloads.items():
            order = variants if round_ % 2 == 0 else variants[::-1]
            for variant in order:
                with levers(variant):
                    rate, rows = decode_rows(model, prompt, adapters, args.tokens)
                rates[workload, variant].append(rate)
                tokens[workload, variant] = rows
                print(f"round {round_}: {workload}, {variant}: {rate:.1f} tokens/s", flush=True)
    print(f"\n{args.rows} rows, {args.tokens} greedy tokens each, prompt of {len(prompt)} ids, bf16 base")
    print("| workload | variant | tokens/s (all rows) | x before | rows with before's tokens |")
    print("|---|---|---|---|---|")
    for workload in workloads:
        first = statistics.median(rates[workload, variants[0]])
        for variant in variants:
            rate = statistics.median(rates[workload, variant])
            same = sum(
                a == b for a, b in zip(tokens[workload, variant], tokens[workload, variants[0]], strict=True)
            )
            print(f"| {workload} | {variant} | {rate:.1f} | {rate / first:.2f} | {same}/{args.rows} |")


if __name__ == "__main__":
    main()
