"""What an adapter costs per request on this machine: the base, the base with the adapter unmerged, merged
into a plain copy, and on a 4-bit quantized base, measured side by side in one process.

Every variant generates through `runtime.generate`, the path `deltatune generate`, evaluation and the server
run. Per variant and batch size:
- time to first token (a call with one new token: the prefill and its first token),
- time per further output token ((whole call - first token) / (new tokens - 1)),
- tokens per second and per-request latency (p50 / p99 over the repetitions),
- the resident memory peak while that variant ran (CPU: the kernel's high-water mark, reset per variant;
  CUDA: the allocator's peak), and the variant's weight bytes;
and once: loading the adapter from disk and activating it. Repetitions rotate through the variants (each
round in another order, after a warm-up round), so drift on a shared machine hits all of them alike; ratios
are to the base in the same run. Rows never end early (no end-of-sequence token), so every variant does the
same work. On CUDA every timing waits for the device (`torch.cuda.synchronize`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .settings import VARIANTS, LatencySettings


@dataclass
class Variant:
    name: str
    model: nn.Module | None
    adapter: str | None  # the model-side adapter name its rows use
    skipped: str | None = None  # why it was not measured
    weight_bytes: int = 0
    working_mib: float | None = None  # peak memory above what was resident before its calls
    timings: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # batch -> what -> seconds


def build_variants(model: nn.Module, adapter_dir: Path, settings: LatencySettings) -> list[Variant]:
    """The variants asked for, plus 'unmerged' always (the adapter-load timing uses it), from a freshly loaded
    base `model`, which becomes the 'unmerged' one."""
    from ..core.inject import eject
    from ..core.io import load_adapter

    wanted = settings.variants
    variants = [Variant("base", copy.deepcopy(model), None)]
    quantized_source = copy.deepcopy(model) if "quantized" in wanted else None
    load_adapter(model, adapter_dir)
    variants.append(Variant("unmerged", model.eval(), "default"))  # always built: the load timing uses it
    if "merged" in wanted:
        variants.append(Variant("merged", eject(copy.deepcopy(model), merge=True).eval(), None))
    if quantized_source is not None:
        variants.append(_quantized(quantized_source, adapter_dir, settings.quantize))
    for variant in variants:
        if variant.model is not None:
            variant.weight_bytes = sum(
                t.numel() * t.element_size() for t in (*variant.model.parameters(), *variant.model.buffers())
            )
    order = {name: i for i, name in enumerate(VARIANTS)}
    return sorted(variants, key=lambda v: order[v.name])


def _quantized(model: nn.Module, adapter_dir: Path, scheme: str = "nf4") -> Variant:
    """The adapter on a quantized copy of the base: 4-bit NF4 (QLoRA's serving setup) or, for int8 / int4,
    runtime.weight_only's packed CPU layers in bf16 (`serve --quantize`); or why it cannot be measured."""
    import warnings

    from ..core.io import load_adapter

    why_not = _quantize(model, scheme)
    if why_not is not None:
        return Variant("quantized", None, None, skipped=why_not)
    with warnings.catch_warnings():  # "trained on a float base": the point of this variant
        warnings.simplefilter("ignore")
        load_adapter(model, adapter_dir)
    return Variant("quantized", model.eval(), "default")


def _quantize(model: nn.Module, scheme: str) -> str | None:
    """Quantize `model` in place as `scheme` says; None, or why it cannot be done here."""
    if scheme != "nf4":
        from ..runtime.weight_only import WeightQuantizationUnsupported, quantize_weights

        try:
            quantize_weights(model.to(torch.bfloat16).requires_grad_(False), scheme)
        except WeightQuantizationUnsupported as exc:
            return str(exc)
        return None
    try:
        from ..quant import QuantizationError, quantize_base
    except ImportError as exc:  # the quant extra is not installed: the message names it
        return str(exc)
    try:
        quantize_base(model, bits=4)
    except QuantizationError as exc:  # bitsandbytes without its CPU backend, say
        return str(exc)
    return None


def measure(
    variants: list[Variant], settings: LatencySettings, device: torch.device, vocab_size: int
) -> None:
    """Fill each variant's timings and memory peak: a warm-up round, then `reps` rounds in rotating order."""
    g = torch.Generator().manual_seed(settings.seed)
    prompts = {
        b: [torch.randint(3, vocab_size, (settings.prompt_tokens,), generator=g).tolist() for _ in range(b)]
        for b in settings.batch_sizes
    }
    live = [v for v in variants if v.model is not None]
    for v in live:
        v.model.to(device)
        v.timings = {b: {"first_token_s": [], "request_s": []} for b in settings.batch_sizes}
        before = _resident_mib(device)
        _reset_peak(device)
        for b in settings.batch_sizes:  # warm-up, and this variant's memory peak
            _call(v, prompts[b], settings.new_tokens, device)
        peak = _peak_mib(device)
        v.working_mib = None if peak is None or before is None else max(peak - before, 0.0)
    for rep in range(settings.reps):
        shift = rep % len(live)
        for v in live[shift:] + live[:shift]:
            for b in settings.batch_sizes:
                v.timings[b]["first_token_s"].append(_call(v, prompts[b], 1, device))
                v.timings[b]["request_s"].append(_call(v, prompts[b], settings.new_tokens, device))


def logit_errors(
    variants: list[Variant], settings: LatencySettings, device: torch.device, vocab_size: int
) -> dict:
    """Each adapted variant's next-token logits against the unmerged float32 adapter's, over the largest batch
    of prompts (drawn as `measure` draws them, another seed): max and mean absolute difference, and the share
    of positions whose top token is the same. What the merge or the quantized base changes in the answers."""
    g = torch.Generator().manual_seed(settings.seed + 1)
    rows = max(settings.batch_sizes)
    ids = torch.randint(3, vocab_size, (rows, settings.prompt_tokens), generator=g, device=device)
    reference = next(v for v in variants if v.name == "unmerged")
    want = _logits(reference, ids)
    errors = {}
    for v in variants:
        if v.model is None or v.name in ("base", "unmerged"):
            continue
        got = _logits(v, ids)
        errors[v.name] = {
            "max_abs": (got - want).abs().max().item(),
            "mean_abs": (got - want).abs().mean().item(),
            "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        }
    return errors


def _logits(variant: Variant, ids: torch.Tensor) -> torch.Tensor:
    from ..core.adapters import activated, all_wrappers

    with activated([wrapper for _, wrapper in all_wrappers(variant.model)], variant.adapter):
        return variant.model(input_ids=ids).logits.float()


def _call(variant: Variant, prompts: list[list[int]], new_tokens: int, device: torch.device) -> float:
    from ..runtime import generate

    _sync(device)
    start = time.perf_counter()
    done = generate(
        variant.model, prompts, [variant.adapter] * len(prompts), max_new_tokens=new_tokens,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    _sync(device)
    elapsed = time.perf_counter() - start
    if any(len(c.tokens) != new_tokens for c in done):
        raise RuntimeError(f"{variant.name}: a row ended before {new_tokens} tokens")
    return elapsed


def adapter_load_seconds(model: nn.Module, adapter_dir: Path, reps: int) -> list[float]:
    """Load the adapter from disk into `model` under a fresh name and make it the active one; each time."""
    from ..core.adapters import delete_adapter, set_adapter
    from ..core.io import load_adapter

    times = []
    for i in range(reps + 1):  # the first is a warm-up (file cache, first-use imports)
        start = time.perf_counter()
        load_adapter(model, adapter_dir, adapter_name=f"probe{i}")
        set_adapter(model, f"probe{i}")
        times.append(time.perf_counter() - start)
        set_adapter(model, "default")
        delete_adapter(model, f"probe{i}")
    return times[1:]


def summarize(variants: list[Variant], settings: LatencySettings, load_s: list[float]) -> dict[str, Any]:
    """The report's numbers: medians, spread, p50/p99, tokens/s, and ratios to the base."""
    rows = []
    base = next(v for v in variants if v.name == "base")
    for v in variants:
        if v.model is None:
            rows.append({"variant": v.name, "skipped": v.skipped})
            continue
        for b in settings.batch_sizes:
            memory = {"weight_mib": v.weight_bytes / 2**20, "working_mib": v.working_mib}
            rows.append(_row(v, b, settings.new_tokens) | memory)
    by_key = {(r["variant"], r.get("batch")): r for r in rows}
    for r in rows:
        if "skipped" in r:
            continue
        ref = by_key[(base.name, r["batch"])]
        for what in ("first_token_s", "per_token_s", "request_p50_s"):
            r[f"{what}_x_base"] = r[what] / ref[what]
    return {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},
        "rows": rows,
        "adapter_load_s": {"median": statistics.median(load_s), "min": min(load_s), "max": max(load_s)},
        "noisy": noisy_rows(rows),
    }


NOISY_P99_OVER_P50 = 1.5  # the same request repeated: a tail this far above the median is other work's


def noisy_rows(rows: list[dict[str, Any]]) -> list[str]:
    """The rows whose p99 request time is over 1.5x their p50: the machine was busy while they ran, and
    their numbers (ratios included) should be measured again."""
    return [
        f"{r['variant']} batch {r['batch']}"
        for r in rows
        if "skipped" not in r and r["request_p99_s"] > NOISY_P99_OVER_P50 * r["request_p50_s"]
    ]


def _row(v: Variant, batch: int, new_tokens: int) -> dict[str, Any]:
    first, request = v.timings[batch]["first_token_s"], v.timings[batch]["request_s"]
    first_med, request_med = statistics.median(first), statistics.median(request)
    per_token = [(r - f) / (new_tokens - 1) for r, f in zip(request, first, strict=True)]
    return {
        "variant": v.name, "batch": batch,
        "first_token_s": first_med, "per_token_s": statistics.median(per_token),
        "tokens_per_s": batch * new_tokens / request_med,
        "request_p50_s": _percentile(request, 50), "request_p99_s": _percentile(request, 99),
        "request_spread_s": [min(request), max(request)],
        "first_token_all_s": first, "request_all_s": request,  # every round, in order
    }  # fmt: skip


def _percentile(values: list[float], q: int) -> float:
    """Linear interpolation between order statistics (numpy's default, statistics' "inclusive" method)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def hardware(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured: CPU model and cores, torch threads, GPU name."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "device": str(device),
    }  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 resets the resident high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM:")


def _resident_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mib("VmRSS:")


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
