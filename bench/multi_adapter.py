"""Many adapters on one base, side by side in one process (SmolLM2-135M shape, random init, LoRA r=16 on all
linear layers, eval mode, no_grad, medians of interleaved rounds).

  mixed   N rows, N different adapters, one batch:
            dt-single   deltatune, one adapter active for all rows (the baseline the target is against)
            dt-mixed    deltatune mixed batch (runtime.mixed_adapters: batched per-row LoRA)
            peft-single PEFT 0.21.2, one adapter for all rows
            peft-mixed  PEFT's `adapter_names=` (splits the batch per adapter in Python)
          for `forward` (prompt of --length tokens) and `generate` (greedy, --new-tokens, KV cache).
  swap    time to load an adapter folder from disk and make it the active one (cleanup after it not timed):
            dt-cache     runtime.AdapterCache.load + set_adapter, reusing the free slot an unloaded adapter of
                         the same shapes left (the steady state of a server that evicts and loads)
            dt-cache-fresh the same with max_free_slots=0: every load builds the adapter's modules
            dt-overwrite core.hotswap.overwrite_adapter into a loaded adapter (what peft-hotswap does)
            dt-load      deltatune.load_adapter + set_adapter
            peft-load    PeftModel.load_adapter + set_adapter
            peft-hotswap PEFT's hotswap_adapter (overwrites a loaded adapter of the same shape in place)
            reload       from_pretrained of the whole base from disk + load_adapter

  floor   the least extra time a mixed generate can take over the single-adapter one on this machine: each
          forward pass must read every row's adapter (N x adapter bytes) where the single-adapter batch reads
          one; timed as a sum over a float32 tensor of (N - 1) adapters' bytes, times the forward passes.

python bench/multi_adapter.py mixed --adapters 8 32 --reps 3
python bench/multi_adapter.py swap --reps 7
python bench/multi_adapter.py floor --adapters 8 32
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import base_model, interleaved, median

import deltatune as dt
from deltatune.runtime import AdapterCache, mixed_adapters

SETTING = dict(r=16, lora_alpha=32, target_modules="all-linear")


def save_adapters(root: Path, count: int) -> list[Path]:
    """`count` different r=16 all-linear adapters saved in PEFT's format (deltatune writes it)."""
    model = base_model()
    folders = []
    for i in range(count):
        torch.manual_seed(100 + i)
        name = f"a{i}"
        dt.inject(model, dt.LoraConfig(**SETTING, init_lora_weights=False), adapter_name=name)
        folders.append(dt.save_adapter(model, root / name, adapter_name=name))
        dt.delete_adapter(model, name)
    return folders


def dt_model(folders: list[Path]):
    model = base_model().eval()
    for i, folder in enumerate(folders):
        dt.load_adapter(model, folder, adapter_name=f"a{i}")
    return model


def peft_model(folders: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model().eval(), folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    return model.eval()


def inputs(rows: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49152, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_mixed(args) -> dict:
    results = {}
    for count in args.adapters:
        results.update(mixed_for(args, count))
        gc.collect()
    return results


def mixed_for(args, count: int) -> dict:
    """`count` rows with `count` adapters: forward and generate, four variants side by side."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = save_adapters(Path(tmp), count)
        dtm, pm = dt_model(folders), peft_model(folders)
    names = [f"a{i}" for i in range(count)]
    fwd, gen = inputs(count, args.length), inputs(count, args.prompt_length)

    def run(model, kind: str, **extra) -> None:
        if kind == "forward":
            model(**fwd, **extra)
            return
        n = args.new_tokens
        model.generate(**gen, **extra, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def dt_call(kind: str, mixed: bool):
        def call():
            with torch.no_grad(), mixed_adapters(dtm, names) if mixed else contextlib.nullcontext():
                if not mixed:
                    dt.set_adapter(dtm, "a0")
                run(dtm, kind)

        return call

    def peft_call(kind: str, mixed: bool):
        extra = {"adapter_names": names} if mixed else {}

        def call():
            if not mixed:
                pm.set_adapter("a0")
            with torch.no_grad():
                run(pm, kind, **extra)

        return call

    for kind in ("forward", "generate"):
        fns = {
            "dt-single": dt_call(kind, False),
            "dt-mixed": dt_call(kind, True),
            "peft-single": peft_call(kind, False),
            "peft-mixed": peft_call(kind, True),
        }
        print(f"{count} adapters, {kind}", file=sys.stderr)
        times = interleaved(fns, args.reps)
        med = {k: median(v) for k, v in times.items()}
        results[f"{count}/{kind}"] = {
            "median_s": med,
            "dt_mixed_x_dt_single": med["dt-mixed"] / med["dt-single"],
            "peft_mixed_x_peft_single": med["peft-mixed"] / med["peft-single"],
            "peft_mixed_x_dt_mixed": med["peft-mixed"] / med["dt-mixed"],
        }
        print(json.dumps({f"{count}/{kind}": results[f"{count}/{kind}"]}, indent=1), flush=True)
    return results


def run_swap(args) -> dict:
    from peft.utils.hotswap import hotswap_adapter
    from transformers import LlamaForCausalLM

    from deltatune.core.hotswap import overwrite_adapter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        folders = save_adapters(root, 3)
        base_dir = Path(tmp) / "base"
        base_model().save_pretrained(base_dir)
        caches = {}
        for variant, free_slots in (("dt-cache", 4), ("dt-cache-fresh", 0)):
            cache = caches[variant] = AdapterCache(base_model().eval(), root, max_free_slots=free_slots)
            cache.load("a0")  # a server that has served one adapter: the wrappers exist
        plain = dt_model(folders[:1])
        swapped = dt_model(folders[:1])
        pm = peft_model(folders[:1])
        counter = iter(range(10**6))

        def timed(load, cleanup=None):
            def call() -> float:
                started = time.perf_counter()
                result = load()
                elapsed = time.perf_counter() - started
                if cleanup is not None:
                    cleanup(result)
                return elapsed

            return call

        def cache_load(variant):
            cache = caches[variant]

            def load():
                key = cache.load("a1").key
                dt.set_adapter(cache.model, key)

            return timed(load, lambda _: cache.unload("a1"))

        def dt_load():
            name = f"x{next(counter)}"
            dt.load_adapter(plain, folders[1], adapter_name=name)
            dt.set_adapter(plain, name)
            return name

        def peft_load():
            pm.load_adapter(folders[1], adapter_name="b")
            pm.set_adapter("b")

        def peft_cleanup(_):
            pm.delete_adapter("b")
            pm.set_adapter("a0")

        fns = {
            "dt-cache": cache_load("dt-cache"),
            "dt-cache-fresh": cache_load("dt-cache-fresh"),
            "dt-overwrite": timed(lambda: overwrite_adapter(swapped, "a0", folders[1 + next(counter) % 2])),
            "dt-load": timed(dt_load, lambda name: dt.delete_adapter(plain, name)),
            "peft-load": timed(peft_load, peft_cleanup),
            "peft-hotswap": timed(lambda: hotswap_adapter(pm, str(folders[1 + next(counter) % 2]), "a0")),
            "reload": timed(
                lambda: dt.load_adapter(
                    LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval(), folders[1]
                )
            ),
        }
        times = interleaved(fns, args.reps)
        med = {k: median(v) for k, v in times.items()}
        size = (folders[1] / "adapter_model.safetensors").stat().st_size
        out = {
            "adapter_bytes": size,
            "median_s": med,
            "x_dt_cache": {k: v / med["dt-cache"] for k, v in med.items()},
        }
        print(json.dumps(out, indent=1))
        return out


def run_floor(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        adapter_bytes = (save_adapters(Path(tmp), 1)[0] / "adapter_model.safetensors").stat().st_size
    out = {"adapter_bytes": adapter_bytes}
    for count in args.adapters:
        extra = torch.ones((count - 1) * adapter_bytes // 4)
        times = interleaved({"read": lambda extra=extra: extra.sum()}, reps=7, progress=False)["read"]
        per_pass = median(times)
        out[f"{count}/generate"] = {
            "extra_bytes_per_pass": (count - 1) * adapter_bytes,
            "read_s_per_pass": per_pass,
            "forward_passes": args.new_tokens,
            "least_extra_s": per_pass * args.new_tokens,
            "bandwidth_GBps": (count - 1) * adapter_bytes / per_pass / 1e9,
        }
        del extra
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["mixed", "swap", "floor"])
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--length", type=int, default=128, help="tokens per row in the forward benchmark")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens per row for generate")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    run = {"mixed": run_mixed, "swap": run_swap, "floor": run_floor}[args.what]
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
